"""Model compression: unstructured magnitude masks, structured head/neuron removal, reports."""
