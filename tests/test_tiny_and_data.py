import json
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import DataConfig
from rlhf_ray.data.batch import RolloutBatch
from rlhf_ray.data.prompts import PromptStream, run_prompts
from rlhf_ray.models.tiny import TinyModelSpec, build_tiny_model
from rlhf_ray.tracking import MetricsWriter, PhaseTimer, plot_metrics, read_metrics


def test_tiny_model_is_deterministic_safetensors_and_loads(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in __import__("pathlib").Path(tiny_model_dir).iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    other = build_tiny_model(tmp_path / "again", TinyModelSpec())
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    b = AutoModelForCausalLM.from_pretrained(other)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    c = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "seed1", TinyModelSpec(seed=1)))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("12+7=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and tok.decode(ids) == "12+7="
    out = a.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, 8)


def test_batch_layout_and_split():
    batch = RolloutBatch.from_token_lists([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    assert batch.prompt_len == 2
    assert batch.sequences.tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.position_ids()[1].tolist()[:3] == [0, 0, 1]
    assert batch.prompt_token_lists() == [[5, 6], [7]]
    assert batch.response_token_lists() == [[1, 2, 3], [4]]
    with_extra = batch.with_extras(score=torch.tensor([1.0, 2.0]))
    shards = with_extra.chunk(2)
    assert [s.size for s in shards] == [1, 1] and shards[1].extras["score"].tolist() == [2.0]
    again = RolloutBatch.concat(shards)
    assert torch.equal(again.sequences, batch.sequences) and again.extras["score"].tolist() == [1.0, 2.0]


def test_prompt_stream_is_resumable_and_covers_every_prompt():
    prompts = [f"p{i}" for i in range(10)]
    stream = PromptStream(prompts, seed=1)
    first = stream.next_batch(4) + stream.next_batch(4) + stream.next_batch(4)
    assert sorted(first[:10]) == sorted(prompts)  # one full epoch before any repeat
    resumed = PromptStream(prompts, seed=1)
    resumed.position = 8
    assert resumed.next_batch(4) == first[8:12]


def test_prompts_from_jsonl_reports_skipped_rows(tmp_path, capsys):
    from rlhf_ray.data.formats import DataError
    from rlhf_ray.models.tiny import build_tokenizer

    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"q": "a?"}, {"q": ""}, {"q": "b?"}, {"q": None}]))
    skip = DataConfig(prompts=str(f), fields={"prompt": "q"}, on_bad_row="skip")
    assert run_prompts(skip, seed=0) == ["a?", "b?"]
    out = capsys.readouterr().out
    assert "skipped 2 rows (1 empty text, 1 missing field)" in out and "prompts.jsonl row 2, field 'q'" in out
    with pytest.raises(DataError, match="prompts.jsonl row 2, field 'q': empty text"):
        run_prompts(DataConfig(prompts=str(f), fields={"prompt": "q"}), seed=0)
    with pytest.raises(DataError, match="row 1, field 'prompt': missing field.*remap with data.fields"):
        run_prompts(DataConfig(prompts=str(f)), seed=0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        run_prompts(DataConfig(prompts=str(tmp_path / "missing.jsonl")), seed=0)
    # With a tokenizer, long prompts are cut from the left (or dropped) and counted.
    f.write_text(json.dumps({"q": "x" * 10 + "1+1="}) + "\n" + json.dumps({"q": "2+2="}) + "\n")
    cfg = DataConfig(prompts=str(f), fields={"prompt": "q"}, max_prompt_tokens=6)
    assert run_prompts(cfg, seed=0, tokenizer=build_tokenizer()) == ["xx1+1=", "2+2="]
    assert "truncated 1 prompts" in capsys.readouterr().out
    cfg.prompt_overflow = "drop"
    assert run_prompts(cfg, seed=0, tokenizer=build_tokenizer()) == ["2+2="]
    assert "dropped 1 prompts" in capsys.readouterr().out
    assert len(run_prompts(DataConfig(task="arithmetic", num_prompts=7), seed=0, tokenizer=build_tokenizer())) == 7
    assert capsys.readouterr().out == ""  # nothing to report: nothing printed


def test_metrics_round_trip_and_plot(tmp_path):
    writer = MetricsWriter(tmp_path)
    timer = PhaseTimer()
    with timer("generate"):
        pass
    for i in range(3):
        writer.write({"iteration": i + 1, "reward_mean": float(i), "bad": float("nan"), **timer.seconds})
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3] and rows[0]["bad"] is None
    assert "generate" in rows[0]
    png = plot_metrics(tmp_path, keys=["reward_mean"])
    assert png.stat().st_size > 1000


def test_builtin_tiny_holds_the_runs_context_with_the_same_weights(tiny_model_dir):
    """A run asking for more positions than the builder's default gets a context that holds them
    (vLLM refuses a max_model_len past the model's), and the same weights as a default build."""
    from safetensors.torch import load_file

    from rlhf_ray.config import load_config
    from rlhf_ray.stages.common import resolve_policy_path

    long = resolve_policy_path(load_config(None, ["rollout.max_model_len=1024"]))
    config = json.loads((Path(long) / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024
    weights, default = (load_file(f"{d}/model.safetensors") for d in (long, tiny_model_dir))
    assert weights.keys() == default.keys() and all(torch.equal(weights[k], default[k]) for k in weights)
