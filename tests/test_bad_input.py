"""Bad input stops ``rlhf-ray ppo`` with one clear message, before Ray or any actor starts.

Each case runs the real CLI entry in-process and reads what a user sees on stderr. Ray's start
and the actors' launch are replaced by tripwires: reaching them fails the test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rlhf_ray.cli import main
from rlhf_ray.config import dump_config, load_config
from rlhf_ray.stages import checkpoint as ckpt
from rlhf_ray.stages import ppo

# The built-in task for the stages that read its data; a reward function for PPO runs on a file of prompts.
BASE = ["model.tiny_hidden_size=32", "model.tiny_layers=1", "data.num_prompts=16", "data.task=arithmetic",
        "scorers.reward_functions=[rlhf_ray.tasks.rewards:digit_fraction]"]


@pytest.fixture
def no_expensive_work(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("bad input was not caught before Ray or the actors started")

    monkeypatch.setattr(ppo, "begin", tripwire)  # writes config.yaml, then starts Ray
    monkeypatch.setattr(ppo, "launch_roles", tripwire)


def _ppo_error(capsys, run_dir: Path, *overrides: str, resume: bool = False) -> str:
    """Runs ``rlhf-ray ppo`` and returns its one-message stderr (exit status 2, no traceback)."""
    argv = ["ppo", *(["--resume"] if resume else []), f"run_dir={run_dir}", *BASE, *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("rlhf-ray: ") == 1 and "Traceback" not in err, err
    return err[err.index("rlhf-ray: "):].strip()  # after any progress bar of the tiny model's build


def _model_folder(path: Path, weights: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / weights).write_bytes(b"\0" * 16)
    return path


MODEL_PATH_CASES = {
    "missing": (lambda t: [f"model.policy={t / 'missing'}"],
                r"^rlhf-ray: model\.policy: model path '.*/missing' does not exist$"),
    "no config.json": (lambda t: [f"model.policy={t / 'empty'}"],
                       r"^rlhf-ray: model\.policy: '.*/empty' is not a model folder: it has no config\.json$"),
    "a file": (lambda t: [f"model.policy={t / 'weights.safetensors'}"],
               r"^rlhf-ray: model\.policy: model path '.*weights\.safetensors' is a file, expected a model folder$"),
    "pickle weights only": (lambda t: [f"model.policy={t / 'pickled'}"],
                            (r"^rlhf-ray: model\.policy: model folder '.*/pickled' has weights only as pickles "
                             r"\(pytorch_model\.bin\), .* convert them to safetensors")),
    "reward model missing": (lambda t: [f"model.reward=[{t / 'rm-missing'}]"],
                             r"^rlhf-ray: model\.reward\[0\]: model path '.*rm-missing' does not exist$"),
    "critic not a model": (lambda t: [f"model.critic={t / 'empty'}"],
                           r"^rlhf-ray: model\.critic: '.*/empty' is not a model folder"),
}


@pytest.mark.parametrize("case", list(MODEL_PATH_CASES))
def test_bad_model_paths_name_the_key_and_the_problem(case, tmp_path, capsys, no_expensive_work):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"\0")
    _model_folder(tmp_path / "pickled", "pytorch_model.bin")
    overrides, expected = MODEL_PATH_CASES[case]
    err = _ppo_error(capsys, tmp_path / "run", *overrides(tmp_path))
    assert re.search(expected, err), err


def test_every_stage_checks_its_model_paths_before_writing(tmp_path, capsys, monkeypatch):
    """``rm.init`` (read by ``rlhf-ray rm`` only) is checked like the model paths, and the run
    folder is not even created."""
    from rlhf_ray.stages import rm

    monkeypatch.setattr(rm, "begin", lambda *a: pytest.fail("bad input was not caught before Ray started"))
    assert main(["rm", f"run_dir={tmp_path / 'run'}", *BASE, f"rm.init={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"rlhf-ray: rm\.init: model path '.*/missing' does not exist$", err.strip()), err
    assert not (tmp_path / "run").exists()


def test_reward_classifiers_must_give_one_score(tmp_path, capsys, no_expensive_work):
    """A sequence-classification folder (Skywork-Reward's format) passes the checks as a reward
    model and as the critic's start; one with two labels is refused under its key, naming the file
    and num_labels."""
    from rlhf_ray.models.tiny import build_tiny_reward_model

    one, two = build_tiny_reward_model(tmp_path / "one", "llama"), build_tiny_reward_model(tmp_path / "two", "llama", 2)
    err = _ppo_error(capsys, tmp_path / "run", f"model.reward=[{one},{two}]")
    assert err == (f"rlhf-ray: model.reward[1]: {two}/config.json: num_labels is 2 (id2label has 2 entries); "
                   f"a reward or value model needs a head with one output (num_labels: 1)"), err
    with pytest.raises(AssertionError, match="bad input was not caught"):  # every check passed: the tripwire
        main(["ppo", f"run_dir={tmp_path / 'run'}", *BASE, f"model.reward=[{one}]", f"model.critic={one}"])


def test_a_critic_start_with_another_vocabulary_is_refused(tmp_path, capsys, no_expensive_work, bpe_tokenizer):
    from rlhf_ray.models.tiny import build_tiny_reward_model

    qwen = build_tiny_reward_model(tmp_path / "qwen", "qwen2", tokenizer=bpe_tokenizer)
    err = _ppo_error(capsys, tmp_path / "run", f"model.critic={qwen}")
    assert re.search(r"^rlhf-ray: model\.critic: the tokenizer of .*/qwen gives \d+ of the policy's \d+ tokens "
                     r"another id \(e\.g\. .*\); the critic reads the policy's token ids", err), err


def test_the_gpu_configs_accept_a_reward_classifier_folder(tmp_path, tiny_model_dir):
    """The shipped GPU configs name Skywork-Reward (a sequence classifier); such a folder, local,
    passes the input checks (the policy, a hub name there, is a local folder here: no hub is
    reachable, and a hub name this machine cannot get is refused)."""
    from rlhf_ray.models.tiny import build_tiny_reward_model
    from rlhf_ray.stages.common import check_inputs

    folder = build_tiny_reward_model(tmp_path / "skywork-like", "llama")
    for name in ("llama8b_2x8gpu_ppo.yaml", "llama70b_zero3_offload_ppo.yaml"):
        cfg = load_config(Path(__file__).parent.parent / "configs" / name,
                          [f"model.reward=[{folder}]", f"model.policy={tiny_model_dir}"])
        check_inputs(cfg)


def test_damaged_model_files_are_named_before_any_work(tmp_path, tiny_model_dir, capsys, no_expensive_work):
    """A truncated weights file and a tokenizer.json cut short (an interrupted download) are named
    by file, under the key that points at the folder."""
    import shutil

    for name, damage in (("model.safetensors", lambda b: b[: len(b) // 2]), ("tokenizer.json", lambda b: b[:100])):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        (folder / name).write_bytes(damage((folder / name).read_bytes()))
        err = _ppo_error(capsys, tmp_path / "run", f"model.critic={folder}")
        assert err.startswith(f"rlhf-ray: model.critic: model folder '{folder}': {name} is not "), err


def test_safetensors_beside_a_stray_pickle_pass_the_model_check(tmp_path):
    from safetensors.torch import save_file

    from rlhf_ray.models.loading import check_model_path

    folder = _model_folder(tmp_path / "m", "pytorch_model.bin")
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    assert check_model_path(folder) == str(folder)
    sharded = _model_folder(tmp_path / "sharded", "pytorch_model-00001-of-00002.bin")
    (sharded / "model.safetensors.index.json").write_text("{}")
    assert check_model_path(sharded) == str(sharded)


def test_an_unrelated_safetensors_file_does_not_excuse_pickled_weights(tmp_path):
    """transformers would load pytorch_model.bin here (an adapter's or a head's safetensors are
    not the model's weights), so the folder is refused."""
    from rlhf_ray.models.loading import UnsafeWeightsError, check_model_path

    folder = _model_folder(tmp_path / "m", "pytorch_model.bin")
    (folder / "adapter_model.safetensors").write_bytes(b"\0")
    with pytest.raises(UnsafeWeightsError, match="weights only as pickles"):
        check_model_path(folder)


def test_bad_data_config_and_secrets_name_what_is_wrong(tmp_path, capsys, no_expensive_work):
    run = tmp_path / "run"
    assert re.search(r"^rlhf-ray: data file .*/missing\.jsonl does not exist$",
                     _ppo_error(capsys, run, f"data.prompts={tmp_path / 'missing.jsonl'}"))
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "1+1="}\n{"prompt": ""}\n')
    assert "prompts.jsonl row 2, field 'prompt': empty text" in _ppo_error(capsys, run, f"data.prompts={rows}")
    assert re.search(r"^rlhf-ray: invalid config \(defaults\):\n  ppo\.kl_coef: must be >= 0$",
                     _ppo_error(capsys, run, "ppo.kl_coef=-1"))
    assert "ppo.kl_cof" in _ppo_error(capsys, run, "ppo.kl_cof=0.1")  # a typo, named with its fix
    endpoint = ["scorers.http.urls=[http://127.0.0.1:9/score]", "scorers.http.token_env=RLHF_RAY_TEST_UNSET_TOKEN"]
    assert _ppo_error(capsys, run, *endpoint) == (
        "rlhf-ray: scorers.http.token_env: the environment variable RLHF_RAY_TEST_UNSET_TOKEN (the reward "
        "endpoint's token) is not set")
    assert "scorers.http.urls[0]: a token must not travel in clear text: use https" in _ppo_error(
        capsys, run, "scorers.http.urls=[http://rewards.example.com/score]", "scorers.http.token_env=T")


# --- checkpoints -------------------------------------------------------------------------------

def _fake_learners(tmp: Path) -> None:
    (tmp / "policy").mkdir()
    (tmp / "policy" / "shard.pt").write_bytes(b"x" * 10)


def _checkpoint(run_dir: Path, *overrides: str) -> Path:
    """A complete checkpoint at iteration 2 written by a run with these overrides."""
    cfg = load_config(None, [f"run_dir={run_dir}", *BASE, *overrides])
    state = {"iteration": 2, "prompts_position": 64, "kl_controller": {"kl_coef": 0.05},
             "guards": {"overopt": {"proxy": [], "gold": []}}, "faults": {}}
    return ckpt.save_checkpoint(run_dir, 2, state, dump_config(cfg), _fake_learners)


def test_bad_checkpoints_stop_the_resume_with_the_reason(tmp_path, capsys, no_expensive_work):
    run = tmp_path / "run"
    path = _checkpoint(run, "policy.num_ranks=1", "data.num_prompts=32")
    err = _ppo_error(capsys, run, resume=True)
    assert f"rlhf-ray: cannot resume from {path}: the config differs in keys a resumed run must keep:" in err
    assert "  data.num_prompts: checkpoint 32, now 16" in err and "  policy.num_ranks: checkpoint 1, now 2" in err
    assert "ppo.iterations" not in err  # keys a resumed run may change are no problem

    path = _checkpoint(run)
    state = path / ckpt.TRAINER_STATE
    state.write_bytes(b"\x00" * state.stat().st_size)  # right size, garbage: the manifest cannot tell
    err = _ppo_error(capsys, run, resume=True)
    assert re.search(rf"^rlhf-ray: checkpoint {re.escape(str(path))}: trainer\.pt is unreadable \(.*\); delete the "
                     rf"checkpoint folder to resume from an older one$", err), err


def test_a_checkpoint_without_trainer_state_is_skipped_with_a_warning(tmp_path):
    older = _checkpoint(tmp_path)
    newer = ckpt.save_checkpoint(tmp_path, 4, {"iteration": 4}, "", _fake_learners)
    (newer / ckpt.TRAINER_STATE).unlink()
    with pytest.warns(ckpt.IncompleteCheckpointWarning, match=r"iter-000004: trainer\.pt is missing"):
        assert ckpt.latest_checkpoint(tmp_path) == older


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    """torch.load(weights_only=True): a pickle that would run code on load is an error instead."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    path = _checkpoint(tmp_path)
    torch.save({"iteration": 2, "rng": Payload()}, path / ckpt.TRAINER_STATE)
    with pytest.raises(ckpt.CheckpointError, match=r"trainer\.pt is unreadable \(UnpicklingError"):
        ckpt.load_trainer_state(path)
    assert not marker.exists()
    torch.load(path / ckpt.TRAINER_STATE, weights_only=False)  # the same file, loaded unsafely,
    assert marker.exists()  # does run the code: the refusal above is what protects


# --- the matrix: every command, each bad input refused with one message, nothing written -------

def _bad_files(d: Path) -> dict[str, Path]:
    """Input files that are not what they claim, written before the snapshot of what exists."""
    d.mkdir()
    files = {
        "dup_section.yaml": "ppo:\n  kl_coef: 0.1\nsft:\n  lr: 0.001\nppo:\n  kl_coef: 0.2\n",
        "dup_key.yaml": "ppo:\n  kl_coef: 0.1\n  kl_coef: 0.2\n",
        "syntax.yaml": "ppo:\n  kl_coef: [0.1\n",
        "list.yaml": "- ppo\n- sft\n",
        "bad_json_line.jsonl": '{"prompt": "1+1="}\n{"prompt": \n',
        "row_not_object.jsonl": '{"prompt": "1+1="}\n[1, 2]\n',
        "no_prompt.jsonl": '{"prompt": "1+1="}\n{"text": "2+2="}\n',
        "number_prompt.jsonl": '{"prompt": 5}\n',
        "fake.parquet": "prompt\n1+1=\n",
        "data.xyz": "1+1=",
        "garbage.json": "\x00\x01not json at all",
        "prompts_only.jsonl": '{"prompt": "1+1="}\n',
        "criteria.yaml": "studio:\n  criteria: helpful\n",
        "labels.db": "this text is not an SQLite database " * 10,
        "no_response.csv": "prompt,response\n1+1=,2\n2+2=,\n",
    }
    paths = {name: d / name for name in files}
    for name, text in files.items():
        paths[name].write_text(text)
    (d / "not_utf8.jsonl").write_bytes(b'{"prompt": "1+1="}\n\xff\xfe{"prompt": "2"}\n')
    paths["not_utf8.jsonl"] = d / "not_utf8.jsonl"
    folders = {  # folders that are no dataset layout, or hold a bad row in a shard
        "empty_dir": {},
        "notes_dir": {"notes.txt": "prompts to come\n"},
        "mixed_dir": {"a.jsonl": '{"prompt": "1+1="}\n', "b.csv": "prompt\n2+2=\n"},
        "shards_dir": {"part-1.jsonl": '{"prompt": "1+1="}\n',
                       "part-2.jsonl": '{"prompt": "2+2="}\n{"prompt": 7}\n'},
        "damaged_saved_dir": {"dataset_info.json": "{}", "state.json": "not JSON"},
    }
    for name, contents in folders.items():
        paths[name] = d / name
        paths[name].mkdir()
        for file, text in contents.items():
            (paths[name] / file).write_text(text)
    return paths


@pytest.fixture(scope="module")
def train_test_dict(tmp_path_factory) -> Path:
    """A ``save_to_disk`` DatasetDict of splits train and test, written once: the cases only read it."""
    from datasets import Dataset, DatasetDict

    path = tmp_path_factory.mktemp("saved") / "train_test_dict"
    DatasetDict({split: Dataset.from_list([{"prompt": "1+1=", "response": "2"}])
                 for split in ("train", "test")}).save_to_disk(str(path))
    return path


S = "rlhf-ray: "  # every message starts so, once
BAD_INPUTS = {
    # config files and overrides (every stage loads its config the same way)
    "a second ppo section": (["ppo", "--config", "{dup_section.yaml}"],
                             S + r".*dup_section\.yaml: not valid YAML at line 5, column 1: key 'ppo' appears twice"),
    "a key given twice": (["sft", "--config", "{dup_key.yaml}"], r"line 3, column 3: key 'kl_coef' appears twice"),
    "YAML syntax": (["rm", "--config", "{syntax.yaml}"], r"syntax\.yaml: not valid YAML at line 3"),
    "a list for a config": (["ppo", "--config", "{list.yaml}"], r"list\.yaml: the top level must be a mapping"),
    "missing config file": (["ppo", "--config", "{in}/nope.yaml"], r"config file .*nope\.yaml does not exist"),
    "lr inf": (["ppo", "policy.lr=inf"], r"policy\.lr must be a finite number; got inf"),
    "lr nan": (["sft", "sft.lr=nan"], r"sft\.lr must be a finite number; got nan"),
    "lr 1e23": (["ppo", "policy.lr=1e23"], r"policy\.lr: must be in \(0, 1\] \(a learning rate\); got 1e\+23"),
    "lr 1e3 for rm": (["rm", "rm.lr=1e3"], r"rm\.lr: must be in \(0, 1\]"),
    "clip 1e400": (["ppo", "ppo.clip_eps=1e400"], r"ppo\.clip_eps must be a finite number"),
    "iterations inf": (["ppo", "ppo.iterations=inf"], r"ppo\.iterations must be an integer; got 'inf'"),
    "iterations 1e23": (["ppo", "ppo.iterations=1e23"], r"ppo\.iterations must be an integer; got '1e23'"),
    "iterations true": (["ppo", "ppo.iterations=true"], r"ppo\.iterations must be an integer; got True"),
    "num_prompts -5": (["ppo", "data.num_prompts=-5"], r"data\.num_prompts: must be >= 1"),
    "num_prompts 1.5": (["ppo", "data.num_prompts=1.5"], r"data\.num_prompts must be an integer; got 1\.5"),
    "tiny_layers -1": (["sft", "model.tiny_layers=-1"], r"model\.tiny_layers: must be >= 1"),
    "tiny width 48": (["ppo", "model.tiny_hidden_size=48"], r"model\.tiny_hidden_size: must be a positive multiple"),
    "temperature -1": (["collect", "rollout.temperature=-1"], r"rollout\.temperature: must be > 0"),
    "max_new_tokens 0": (["ppo", "rollout.max_new_tokens=0"], r"rollout\.max_new_tokens: must be >= 1"),
    "engines -1": (["ppo", "rollout.num_engines=-1"], r"rollout\.num_engines: must be >= 1"),
    "ranks 0": (["dpo", "policy.num_ranks=0"], r"policy\.num_ranks: must be >= 1"),
    "zero stage 5": (["ppo", "critic.zero_stage=5"], r"critic\.zero_stage: must be 0, 1, 2 or 3"),
    "dtype typo": (["ppo", "model.dtype=float13"], r"model\.dtype must be one of float32, bfloat16, float16"),
    "key typo": (["ppo", "ppo.kl_cof=0.1"], r"unknown config key ppo\.kl_cof; did you mean ppo\.kl_coef\?"),
    "section typo": (["ppo", "pop.kl_coef=0.1"], r"unknown config key pop; did you mean ppo\?"),
    "override without =": (["ppo", "ppo.kl_coef"], r"override 'ppo\.kl_coef' must look like section\.key=value"),
    "a value for a section": (["ppo", "ppo=3"], r"ppo must be a mapping"),
    "empty run_dir": (["ppo", "run_dir="], r"run_dir"),
    "PPO without a reward": (["ppo", "data.task=", "scorers.reward_functions=[]", "data.prompts={prompts_only.jsonl}"],
                             r"model\.reward: no reward source"),
    # a user's own task: each reward function is imported and checked against the rows' columns
    "a reward that does not import": (["ppo", "data.prompts={prompts_only.jsonl}", "scorers.reward_functions=[nope_mod:f]"],
                                      r"scorers\.reward_functions\[0\]: reward function 'nope_mod:f' cannot be loaded"),
    "a reward without (prompts, responses)": (
        ["ppo", "data.prompts={prompts_only.jsonl}", "scorers.reward_functions=[rlhf_ray.tasks.rewards:load_reward_function]"],
        r"reward function 'load_reward_function' must take \(prompts, responses, \*\*columns\)"),
    "a column the rows lack": (["ppo", "data.prompts={prompts_only.jsonl}",
                                "scorers.reward_functions=[rlhf_ray.tasks.verifiers:math_answer]"],
                               (r"reward function 'math_answer' needs the column 'answer', but the prompt rows have "
                                r"no such column \(columns in every row: none")),
    # data files
    "missing prompts": (["ppo", "data.prompts={in}/nope.jsonl"], r"data file .*nope\.jsonl does not exist"),
    "not UTF-8": (["ppo", "data.prompts={not_utf8.jsonl}"], r"not_utf8\.jsonl row 2: .*not UTF-8"),
    "a line cut short": (["collect", "data.prompts={bad_json_line.jsonl}"], r"bad_json_line\.jsonl row 2: .*not valid JSON"),
    "a row not an object": (["ppo", "data.prompts={row_not_object.jsonl}"], r"row_not_object\.jsonl row 2: .*must be an object"),
    "a missing field": (["ppo", "data.prompts={no_prompt.jsonl}"], r"no_prompt\.jsonl row 2, field 'prompt': missing field"),
    "a number for text": (["ppo", "data.prompts={number_prompt.jsonl}"], r"number_prompt\.jsonl row 1, field 'prompt': wrong type"),
    "text named parquet": (["ppo", "data.prompts={fake.parquet}"], r"fake\.parquet: not a Parquet file"),
    "random bytes as JSON": (["ppo", "data.prompts={garbage.json}"], r"garbage\.json"),
    "unknown extension": (["ppo", "data.prompts={data.xyz}"], r"data\.xyz: unknown format"),
    "pairs without chosen": (["rm", "data.preferences={prompts_only.jsonl}"],
                             r"prompts_only\.jsonl row 1, field 'chosen': missing field"),
    "sft rows without response": (["sft", "data.sft={prompts_only.jsonl}"],
                                  r"prompts_only\.jsonl row 1, field 'response': missing field"),
    "a CSV record without response": (["sft", "data.sft={no_response.csv}"],
                                      r"no_response\.csv row 2, field 'response': empty text$"),
    # dataset folders
    "a folder with no data files": (
        ["ppo", "data.prompts={notes_dir}"],
        (r"notes_dir: a directory with no dataset_info\.json or state\.json \(not a save_to_disk folder\) "
         r"and no \.jsonl/\.json/\.parquet/\.csv files \(it holds notes\.txt\)$")),
    "an empty folder": (["sft", "data.sft={empty_dir}"], r"empty_dir: an empty directory \(no \.jsonl/"),
    "a folder of two shard kinds": (["rm", "data.preferences={mixed_dir}"],
                                    r"mixed_dir: a directory of shards of more than one kind \(1 \.csv, "),
    "a bad row in the second shard": (["ppo", "data.prompts={shards_dir}"],
                                      r"shards_dir/part-2\.jsonl row 2, field 'prompt': wrong type"),
    "a damaged save_to_disk folder": (["dpo", "data.preferences={damaged_saved_dir}"],
                                      r"damaged_saved_dir: not a readable save_to_disk folder \("),
    "prompts from a DatasetDict without the split": (
        ["ppo", "data.prompts={train_test_dict}", "data.split=validation"],
        (r"train_test_dict: a save_to_disk DatasetDict \(has splits train, test; data\.split=validation is "
         r"not one of them\)$")),
    "demonstrations from a DatasetDict without the split": (
        ["sft", "data.sft={train_test_dict}", "data.split=validation"],
        r"train_test_dict: a save_to_disk DatasetDict \(has splits train, test; data\.split=validation"),
    # models
    "offline hub id": (["ppo", "model.policy=someorg/some-model"],
                       r"model\.policy: 'someorg/some-model' is not a local folder, and the hub cannot serve it"),
    "missing reward model": (["ppo", "model.reward=[{in}/nope]"], r"model\.reward\[0\]: model path .* does not exist"),
    "missing rm.init": (["rm", "rm.init={in}/nope"], r"rm\.init: model path .* does not exist"),
    "eval of a missing model": (["eval", "eval.models.sft={in}/nope"], r"eval\.models\.sft: model path .*does not exist"),
    "check-sync of a missing model": (["check-sync", "{in}/nope"], r"model path .*nope' does not exist"),
    "build-tiny unknown arch": (["build-tiny", "{in}/tiny", "--arch", "nope"],
                                r"build-tiny: unknown architecture 'nope'"),
    # the studio
    "stats of a missing database": (["annotate", "stats", "--db", "{in}/typo/labels.db"],
                                    r"annotation database .*typo/labels\.db does not exist"),
    "stats of a text file": (["annotate", "stats", "--db", "{labels.db}"], r"labels\.db is not an annotation database"),
    "export with agreement 5": (["annotate", "export", "--db", "{in}/new.db", "--out", "{in}/out.jsonl",
                                 "--min-agreement", "5"], r"--min-agreement must be a share between 0 and 1"),
    "add-annotator to a missing database": (["annotate", "add-annotator", "--db", "{in}/none.db", "ann"],
                                            r"annotation database .*none\.db does not exist"),
    "serve on port 99999": (["annotate", "serve", "--db", "{in}/new.db", "--pairs", "{prompts_only.jsonl}",
                             "--port", "99999"], r"--port must be between 0 and 65535"),
    "serve with overlap-k -3": (["annotate", "serve", "--db", "{in}/new.db", "--overlap-k", "-3"],
                                r"--overlap-k must be at least 2"),
    "serve pairs without chosen": (["annotate", "serve", "--db", "{in}/new.db", "--pairs", "{prompts_only.jsonl}"],
                                   r"prompts_only\.jsonl row 1, field 'chosen'"),
    "serve criteria not a list": (["annotate", "serve", "--db", "{in}/new.db", "--config", "{criteria.yaml}"],
                                  r"criteria\.yaml: studio\.criteria must be a list"),
    "serve on a public address": (["annotate", "serve", "--db", "{in}/new.db", "--host", "0.0.0.0"],
                                  r"refusing to bind '0\.0\.0\.0'"),
    "view of a missing run": (["view", "{in}/norun"], r"norun has neither metrics\.jsonl nor samples\.jsonl"),
}
STAGE_ARGS = ("ppo", "sft", "rm", "dpo", "collect", "eval", "pipeline")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def no_stage_starts(monkeypatch):
    """Every stage's ``begin`` (the first write into run_dir, then Ray) is a tripwire."""
    import importlib

    def tripwire(*args, **kwargs):
        raise AssertionError("bad input was not caught before the run's folder was written")

    for stage in STAGE_ARGS:
        monkeypatch.setattr(importlib.import_module(f"rlhf_ray.stages.{stage}"), "begin", tripwire)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_is_one_message_and_nothing_is_written(case, tmp_path, capsys, monkeypatch,
                                                              no_stage_starts, train_test_dict):
    files = _bad_files(tmp_path / "in")
    argv, expected = BAD_INPUTS[case]
    for name, path in {"in": tmp_path / "in", "train_test_dict": train_test_dict, **files}.items():
        argv = [a.replace(f"{{{name}}}", str(path)) for a in argv]
    if argv[0] in STAGE_ARGS:
        argv = [*argv[:1], *([] if any(a.startswith("run_dir=") for a in argv) else [f"run_dir={tmp_path / 'run'}"]),
                *BASE, *argv[1:]]
    monkeypatch.chdir(tmp_path)  # an empty run_dir would write here
    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count(S) == 1 and "Traceback" not in err, err
    assert re.search(expected, err), err
    assert _tree(tmp_path) == before  # nothing made, nothing changed


HUB_READERS = {  # a stage and the key of the hub dataset it reads
    "sft demonstrations": ["sft", "data.sft=org/demos"],
    "rm preference pairs": ["rm", "data.preferences=org/pairs"],
    "ppo prompts": ["ppo", "data.prompts=org/prompts"],
    "ppo pretraining text": ["ppo", "ppo.ptx_coef=0.1", "ppo.ptx_data=org/text"],
}


@pytest.mark.parametrize("case", list(HUB_READERS))
def test_every_stage_reads_a_hub_dataset_with_its_subset_and_split(case, tmp_path, capsys, no_stage_starts,
                                                                   hub_stand_in):
    """data.subset and data.split reach ``datasets.load_dataset`` from each stage that reads data
    (a stand-in here, tests/conftest.py: no hub is reachable), and a split the dataset lacks is one
    message before anything is written."""
    stage, *keys = HUB_READERS[case]
    overrides = [*keys, "data.subset=main", "data.split=validation"]
    assert main([stage, f"run_dir={tmp_path / 'run'}", *BASE, *overrides]) == 2
    name = keys[-1].partition("=")[2]
    assert hub_stand_in == [(name, "main", "validation")]
    err = capsys.readouterr().err
    assert err.count(S) == 1 and "Traceback" not in err, err
    assert err.strip().endswith(f"{S}{name}: cannot be read with data.subset='main' and "
                                f"data.split='validation' (Unknown split \"validation\". Should be one of "
                                f"['train', 'test'].)"), err
    assert not (tmp_path / "run").exists()


def test_the_matrix_covers_forty_inputs_across_the_commands():
    assert len(BAD_INPUTS) >= 40
    commands = {argv[0] for argv, _ in BAD_INPUTS.values()}
    assert commands >= {"ppo", "sft", "rm", "dpo", "collect", "eval", "check-sync", "build-tiny", "annotate", "view"}


@pytest.mark.parametrize("damage", ["COMPLETE not a manifest", "config.yaml a list", "config.yaml not YAML",
                                    "trainer.pt empty"])
def test_a_damaged_checkpoint_is_named_and_nothing_is_changed(damage, tmp_path, capsys, no_expensive_work):
    run = tmp_path / "run"
    path = _checkpoint(run)
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n{"iteration": 2}\n')
    target, content = {"COMPLETE not a manifest": (ckpt.COMPLETE, "[1, 2]"),
                       "config.yaml a list": ("config.yaml", "- 1\n- 2\n"),
                       "config.yaml not YAML": ("config.yaml", "ppo: [\n"),
                       "trainer.pt empty": (ckpt.TRAINER_STATE, "")}[damage]
    (path / target).write_text(content)
    if target != ckpt.COMPLETE:  # keep the manifest's sizes right: the damage is in the content
        manifest = json.loads((path / ckpt.COMPLETE).read_text())
        manifest["files"][target] = len(content.encode())
        (path / ckpt.COMPLETE).write_text(json.dumps(manifest))
    before = _tree(tmp_path)
    err = _ppo_error(capsys, run, resume=True)
    assert path.name in err and ("COMPLETE" in err or target in err), err
    assert _tree(tmp_path) == before


def test_resuming_on_other_learner_ranks_says_how(tmp_path, capsys, no_expensive_work):
    run = tmp_path / "run"
    _checkpoint(run, "policy.num_ranks=4")
    err = _ppo_error(capsys, run, resume=True)
    assert "policy.num_ranks: checkpoint 4, now 2" in err
    assert "resumes with its checkpoint's num_ranks and zero_stage" in err
