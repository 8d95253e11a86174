"""The dataset layer: every file format and data format, every bad-row case, prompt limits, holdout."""

import csv
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_ray.data import formats as F
from rlhf_ray.data.formats import DataError, LoadReport, PreferencePair, SFTExample
from rlhf_ray.models.tiny import build_tokenizer
from rlhf_ray.tasks import get_task


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class _TemplateTok:
    """Stands in for a tokenizer with a chat template."""

    chat_template = "{{ fake }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# --- files ---------------------------------------------------------------------------------------


def test_jsonl_json_and_parquet_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2=", "response": "4"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    sources = [jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "d.json"), str(tmp_path / "d.parquet")]
    for source in sources:
        examples, report = F.load_sft(source)
        assert examples == [SFTExample("1+1=", "2"), SFTExample("2+2=", "4")], source
        assert (report.rows_read, report.rows_kept, report.skipped) == (2, 2, {})
    # Nested chat messages survive Parquet; a key absent in one JSON record arrives as null: missing.
    pq.write_table(pa.Table.from_pylist([{"messages": msgs(("user", "hi"), ("assistant", "yo"))}]),
                   tmp_path / "chat.parquet")
    assert F.load_sft(str(tmp_path / "chat.parquet"))[0] == [SFTExample("User: hi\nAssistant: ", "yo")]
    (tmp_path / "gap.json").write_text(json.dumps([rows[0], {"prompt": "3+3="}]))
    with pytest.raises(DataError, match=r"gap.json row 2, field 'response': missing field \(null\)"):
        F.load_sft(str(tmp_path / "gap.json"))
    with pytest.raises(FileNotFoundError, match="nope.parquet does not exist"):
        F.load_sft(str(tmp_path / "nope.parquet"))


def test_jsonl_row_numbers_are_line_numbers_and_mixed_types_still_load(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": 5}\n{not json\n')
    rows, name = F.read_rows(str(f))
    assert name == str(f) and [(row.source, row.number) for row in rows] == [(str(f), n) for n in (1, 3, 4)]
    with pytest.raises(DataError, match=r"p.jsonl row 3, field 'prompt': wrong type \(expected text, got int"):
        F.load_prompts(str(f))
    prompts, report = F.load_prompts(str(f), on_bad_row="skip")
    assert prompts == ["a"] and report.skipped == {F.WRONG_TYPE: 2}
    assert "p.jsonl row 4: wrong type (not valid JSON" in report.first_errors[1]


def test_json_with_mixed_types_names_the_record(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": {"x": 1}, "response": "c"}]))
    with pytest.raises(DataError, match="m.json row 2, field 'prompt': wrong type"):
        F.load_sft(str(f))


# --- layouts: save_to_disk folders, CSV, folders of shards, hub subsets and splits ---------------

SFT_ROWS = [{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2=", "response": "4"},
            {"prompt": "Say hi,\nthen bye.", "response": "hi, bye"}]


def test_save_to_disk_dataset_and_dataset_dict_read_the_rows_of_the_jsonl(tmp_path):
    from datasets import Dataset, DatasetDict

    expected, _ = F.load_sft(jsonl(tmp_path / "d.jsonl", SFT_ROWS))
    Dataset.from_list(SFT_ROWS).save_to_disk(str(tmp_path / "saved"))
    examples, report = F.load_sft(str(tmp_path / "saved"), split="ignored by a Dataset folder")
    assert examples == expected and report.source == str(tmp_path / "saved")
    splits = DatasetDict({"train": Dataset.from_list(SFT_ROWS[:1]),
                          "test": Dataset.from_list([*SFT_ROWS, {"prompt": "3+3=", "response": ""}])})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert F.load_sft(str(tmp_path / "splits"))[0] == expected[:1]  # data.split's default: train
    # A bad row is named by the split's folder and its record index.
    bad_row = f"^{re.escape(str(tmp_path))}/splits/test row 4, field 'response': empty text$"
    with pytest.raises(DataError, match=bad_row):
        F.load_sft(str(tmp_path / "splits"), split="test")
    assert F.load_sft(str(tmp_path / "splits"), on_bad_row="skip", split="test")[0] == expected
    with pytest.raises(DataError) as info:
        F.load_sft(str(tmp_path / "splits"), split="validation")
    assert str(info.value) == (f"{tmp_path}/splits: a save_to_disk DatasetDict (has splits train, test; "
                               f"data.split=validation is not one of them)")


def test_csv_reads_the_rows_of_the_jsonl_as_text(tmp_path):
    expected, _ = F.load_sft(jsonl(tmp_path / "d.jsonl", SFT_ROWS))
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as f:  # a byte-order mark, as spreadsheets write
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        for row in SFT_ROWS[:2]:
            writer.writerow([row["prompt"], row["response"]])
        f.write("\r\n")  # a blank line holds no record
        writer.writerow([SFT_ROWS[2]["prompt"], SFT_ROWS[2]["response"]])  # quoted: a comma, a newline
        writer.writerow(["5+5=", ""])
        writer.writerow(["6+6=", "12", "an extra cell"])
    # The numbers stay text: "2" and "4" are responses, not integers.
    examples, report = F.load_sft(str(path), on_bad_row="skip")
    assert examples == expected and report.skipped == {F.EMPTY: 1, F.WRONG_TYPE: 1}
    # Row numbers count records, not lines: the quoted newline above is no new row.
    assert report.first_errors == [
        f"{path} row 4, field 'response': empty text",
        f"{path} row 5: wrong type (not valid CSV: 3 fields where the header has 2)"]


def test_parquet_shards_read_in_name_order_like_one_jsonl(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": f"{n}+1="} for n in range(5)]
    expected, _ = F.load_prompts(jsonl(tmp_path / "all.jsonl", rows))
    folder = tmp_path / "prompts.parquet"  # Spark and Dask name a folder of shards so
    folder.mkdir()
    for index, (start, stop) in reversed(list(enumerate([(0, 2), (2, 3), (3, 5)]))):  # written last first
        Dataset.from_list(rows[start:stop]).to_parquet(str(folder / f"train-{index:05d}-of-00003.parquet"))
    (folder / "_SUCCESS").write_text("")  # a writer's marker and a README are no shards
    (folder / "README.md").write_text("# prompts\n")
    prompts, report = F.load_prompts(str(folder))
    assert prompts == expected and (report.source, report.rows_read) == (str(folder), 5)


def test_jsonl_shards_name_the_shard_and_its_line_of_a_bad_row(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    jsonl(folder / "part-1.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    (folder / "part-2.jsonl").write_text('{"prompt": "c"}\n\n{"prompt": ""}\n{"prompt": "d"}\n')
    rows, name = F.read_rows(str(folder))
    assert name == str(folder)
    assert [(Path(row.source).name, row.number) for row in rows] == [
        ("part-1.jsonl", 1), ("part-1.jsonl", 2), ("part-2.jsonl", 1), ("part-2.jsonl", 3),
        ("part-2.jsonl", 4)]
    bad_row = f"^{re.escape(str(folder))}/part-2\\.jsonl row 3, field 'prompt': empty text$"
    with pytest.raises(DataError, match=bad_row) as info:
        F.load_prompts(str(folder))
    assert (info.value.source, info.value.row) == (str(folder / "part-2.jsonl"), 3)
    prompts, report = F.load_prompts(str(folder), on_bad_row="skip")
    assert prompts == ["a", "b", "c", "d"] and report.source == str(folder)
    assert report.first_errors == [f"{folder}/part-2.jsonl row 3, field 'prompt': empty text"]


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_json_and_csv_shards_read_like_one_jsonl(tmp_path, suffix):
    halves = [SFT_ROWS[:2], SFT_ROWS[2:]]
    folder = tmp_path / "shards"
    folder.mkdir()
    for index, half in enumerate(halves):
        shard = folder / f"{index}{suffix}"
        if suffix == ".json":
            shard.write_text(json.dumps(half))
        else:
            with shard.open("w", newline="") as f:
                writer = csv.DictWriter(f, ["prompt", "response"])
                writer.writeheader()
                writer.writerows(half)
    assert F.load_sft(str(folder))[0] == F.load_sft(jsonl(tmp_path / "d.jsonl", SFT_ROWS))[0]


def test_folders_that_are_no_layout_say_what_they_hold(tmp_path):
    folders = {name: tmp_path / name for name in ("empty", "notes", "mixed", "damaged")}
    for folder in folders.values():
        folder.mkdir()
    (folders["notes"] / "notes.txt").write_text("hi")
    (folders["notes"] / "data").mkdir()  # the shards one level down: subfolders are not read
    jsonl(folders["mixed"] / "a.jsonl", [{"prompt": "a"}])
    jsonl(folders["mixed"] / "b.jsonl", [{"prompt": "b"}])
    (folders["mixed"] / "c.csv").write_text("prompt\nc\n")
    (folders["damaged"] / "state.json").write_text("{")
    expected = {
        "empty": "an empty directory (no .jsonl/.json/.parquet/.csv files, not a save_to_disk folder)",
        "notes": ("a directory with no dataset_info.json or state.json (not a save_to_disk folder) and no "
                  ".jsonl/.json/.parquet/.csv files (it holds data/, notes.txt)"),
        "mixed": ("a directory of shards of more than one kind (1 .csv, 2 .jsonl files; a folder of shards "
                  "holds files of one kind)"),
    }
    for name, message in expected.items():
        with pytest.raises(DataError) as info:
            F.load_prompts(str(folders[name]))
        assert str(info.value) == f"{folders[name]}: {message}"
    damaged = f"^{re.escape(str(folders['damaged']))}: not a readable save_to_disk folder \\(.+\\)$"
    with pytest.raises(DataError, match=damaged):
        F.load_prompts(str(folders["damaged"]))


def test_hub_names_reach_load_dataset_with_their_subset_and_split(hub_stand_in):
    """The name, subset and split reach ``datasets.load_dataset``: here a stand-in (tests/conftest.py),
    as no hub is reachable."""
    from rlhf_ray.config import load_config
    from rlhf_ray.data.prompts import run_prompts

    assert F.load_prompts("openai/gsm8k", {"prompt": "question"}, subset="main", split="test")[0] == ["1+1="]
    assert F.load_sft("org/demos")[0] == [SFTExample("2+2=", "4")]
    cfg = load_config(None, ["data.prompts=org/prompts", "data.subset=socratic", "data.split=test"])
    assert run_prompts(cfg.data, seed=0) == ["2+2="]
    assert hub_stand_in == [("openai/gsm8k", "main", "test"), ("org/demos", None, "train"),
                            ("org/prompts", "socratic", "test")]
    with pytest.raises(DataError) as info:
        F.load_preferences("org/prefs", subset="main", split="validation")
    assert str(info.value) == ("org/prefs: cannot be read with data.subset='main' and "
                               "data.split='validation' (Unknown split \"validation\". Should be one of "
                               "['train', 'test'].)")


# --- SFT -----------------------------------------------------------------------------------------


def test_sft_messages_use_the_fallback_format_or_the_chat_template(tmp_path):
    conv = msgs(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"),
                ("assistant", "6"))
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    (ex,), _ = F.load_sft(src, tokenizer=build_tokenizer())  # no chat template: plain fallback
    assert ex == SFTExample("System: Be brief.\nUser: 2+2?\nAssistant: 4\nUser: 3+3?\nAssistant: ", "6")
    # With a template, both answers are trained: the opening is the prompt, the rest its turns.
    (ex,), _ = F.load_sft(src, tokenizer=_TemplateTok())
    assert ex.prompt == "<system>Be brief.<user>2+2?<assistant>" and ex.response == "6" and ex.turns == conv[2:]
    assert ex.prompt.messages == conv[:2]
    (single,), _ = F.load_sft(jsonl(tmp_path / "one.jsonl", [{"messages": conv[:3]}]), tokenizer=_TemplateTok())
    assert single == SFTExample("<system>Be brief.<user>2+2?<assistant>", "4")


def test_field_remapping(tmp_path):
    src = jsonl(tmp_path / "qa.jsonl", [{"question": "q1", "answer": "a1"}])
    assert F.load_sft(src, {"prompt": "question", "response": "answer"})[0] == [SFTExample("q1", "a1")]
    with pytest.raises(DataError, match=r"qa.jsonl row 1, field 'prompt': missing field \(the row has question, "
                                        r"answer; remap with data.fields"):
        F.load_sft(src)
    conv = jsonl(tmp_path / "conv.jsonl", [{"conversation": msgs(("user", "hi"), ("assistant", "yo"))}])
    assert F.load_sft(conv, {"messages": "conversation"})[0] == [SFTExample("User: hi\nAssistant: ", "yo")]
    pref = jsonl(tmp_path / "pref.jsonl", [{"q": "1+1=", "good": "2", "bad": "3"}])
    pairs, _ = F.load_preferences(pref, {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert pairs == [PreferencePair("1+1=", "2", "3")]
    with pytest.raises(ValueError, match="unknown field name.*promt"):
        F.load_sft(src, {"promt": "question"})


SFT_BAD = [
    ({"response": "x"}, "prompt", F.MISSING),
    ({"prompt": None, "response": "x"}, "prompt", F.MISSING),
    ({"prompt": ["a"], "response": "x"}, "prompt", F.WRONG_TYPE),
    ({"prompt": "p", "response": 7}, "response", F.WRONG_TYPE),
    ({"prompt": "  ", "response": "x"}, "prompt", F.EMPTY),
    ({"prompt": "p", "response": ""}, "response", F.EMPTY),
    ({"messages": "hello"}, "messages", F.WRONG_TYPE),
    ({"messages": []}, "messages", F.EMPTY),
    ({"messages": [{"role": "user"}]}, "messages", F.MISSING),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", F.WRONG_TYPE),
    ({"messages": msgs(("user", "hi"), ("user", "again"))}, "messages", F.NO_ASSISTANT),
    ({"messages": msgs(("user", "hi"), ("assistant", " "))}, "messages", F.EMPTY),
    ({"messages": msgs(("assistant", "hi"))}, "messages", F.EMPTY),
]


@pytest.mark.parametrize("bad,field,kind", SFT_BAD)
def test_sft_bad_rows_error_or_skip(tmp_path, bad, field, kind):
    good = {"prompt": "1+1=", "response": "2"}
    src = jsonl(tmp_path / "sft.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match=f"sft.jsonl row 3, field '{field}': {kind}") as info:
        F.load_sft(src)
    assert (info.value.row, info.value.field, info.value.kind) == (3, field, kind)
    examples, report = F.load_sft(src, on_bad_row="skip")
    assert len(examples) == 3 and report.skipped == {kind: 1}
    assert (report.rows_read, report.rows_kept) == (4, 3)
    assert f"skipped 1 rows (1 {kind})" in report.summary() and "sft.jsonl row 3" in report.summary()


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    src = jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}, {"x": 1}])
    with pytest.raises(DataError, match="no usable prompts.*kept 0 of 2 rows"):
        F.load_prompts(src, on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row"):
        F.load_prompts(src, on_bad_row="ignore")


# --- preferences ---------------------------------------------------------------------------------


def test_preferences_plain_and_as_messages(tmp_path):
    plain = jsonl(tmp_path / "plain.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    assert F.load_preferences(plain)[0] == [PreferencePair("1+1=", "2", "3")]
    implicit = {"chosen": msgs(("user", "hi"), ("assistant", "hello!")),
                "rejected": msgs(("user", "hi"), ("assistant", "go away"))}
    explicit = {"prompt": msgs(("user", "hi")), "chosen": msgs(("assistant", "hello!")),
                "rejected": msgs(("assistant", "go away"))}
    text_prompt = {"prompt": "hi", "chosen": msgs(("assistant", "hello!")),
                   "rejected": msgs(("assistant", "go away"))}
    pairs, report = F.load_preferences(jsonl(tmp_path / "m.jsonl", [implicit, explicit, text_prompt]))
    assert pairs == [PreferencePair("User: hi\nAssistant: ", "hello!", "go away")] * 3
    assert report.rows_kept == 3
    pairs, _ = F.load_preferences(jsonl(tmp_path / "m2.jsonl", [implicit]), tokenizer=_TemplateTok())
    assert pairs[0].prompt == "<user>hi<assistant>"


HH_CHOSEN = ("\n\nHuman: What's a good name for a cat?\n\nAssistant: How about Whiskers?"
             "\n\nHuman: Something less common?\n\nAssistant: Maybe Pistachio, or Admiral Fluff.")
HH_REJECTED = ("\n\nHuman: What's a good name for a cat?\n\nAssistant: How about Whiskers?"
               "\n\nHuman: Something less common?\n\nAssistant: Maybe just call it Cat.")


def test_hh_rlhf_dialogues_are_split_at_the_last_shared_assistant_turn(tmp_path):
    src = jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    (pair,), report = F.load_preferences(src)
    assert report.rows_kept == 1
    assert pair.prompt == ("\n\nHuman: What's a good name for a cat?\n\nAssistant: How about Whiskers?"
                           "\n\nHuman: Something less common?\n\nAssistant:")
    assert pair.chosen == " Maybe Pistachio, or Admiral Fluff."  # the shared " Maybe" stays in each answer
    assert pair.rejected == " Maybe just call it Cat."
    assert pair.prompt + pair.chosen == HH_CHOSEN and pair.prompt + pair.rejected == HH_REJECTED
    # Answers that differ from their first character, and a longer chosen answer with more turns.
    other = F.split_hh_dialogues("\n\nHuman: hi\n\nAssistant: Hello!", "\n\nHuman: hi\n\nAssistant:Go.")
    assert other == PreferencePair("\n\nHuman: hi\n\nAssistant:", " Hello!", "Go.")


@given(st.lists(st.text(alphabet="ab ?", min_size=1, max_size=6), min_size=1, max_size=4),
       st.text(alphabet="xyz", min_size=1, max_size=6), st.text(alphabet="uvw", min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_hh_split_round_trips(turns, chosen, rejected):
    prefix = "".join(f"\n\nHuman: {t}\n\nAssistant: ok" for t in turns) + "\n\nHuman: last\n\nAssistant:"
    pair = F.split_hh_dialogues(prefix + " " + chosen, prefix + " " + rejected)
    assert pair == PreferencePair(prefix, " " + chosen, " " + rejected)


PREF_BAD = [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", F.SAME),
    ({"prompt": "p", "chosen": "same", "rejected": "same "}, "rejected", F.SAME),
    ({"prompt": "p", "rejected": "r"}, "chosen", F.MISSING),
    ({"prompt": "p", "chosen": 1, "rejected": "r"}, "chosen", F.WRONG_TYPE),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, "rejected", F.EMPTY),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, "prompt", F.EMPTY),
    ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "rejected", F.SAME),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}, "rejected",
     F.NO_PREFIX),
    ({"chosen": "Human: hi, how are you", "rejected": "Human: hi, go away"}, "chosen", F.NO_ASSISTANT),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi there"}, "rejected",
     F.NO_ASSISTANT),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant:  "}, "rejected",
     F.EMPTY),
    ({"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "X"), ("assistant", "c"))},
     "rejected", F.NO_PREFIX),
    ({"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "a"), ("assistant", "b"))},
     "rejected", F.SAME),
    ({"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "a"))}, "rejected",
     F.NO_ASSISTANT),
    ({"chosen": msgs(("assistant", "b")), "rejected": msgs(("assistant", "c"))}, "chosen", F.EMPTY),
    ({"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": "c"}, "rejected", F.WRONG_TYPE),
]


@pytest.mark.parametrize("bad,field,kind", PREF_BAD)
def test_preference_bad_rows_error_or_skip(tmp_path, bad, field, kind):
    good = {"chosen": "\n\nHuman: 1+1?\n\nAssistant: 2", "rejected": "\n\nHuman: 1+1?\n\nAssistant: 3"}
    if "prompt" in bad:
        good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    src = jsonl(tmp_path / "prefs.jsonl", [good] * 6 + [bad])
    with pytest.raises(DataError, match=f"prefs.jsonl row 7, field '{field}': {kind}"):
        F.load_preferences(src)
    pairs, report = F.load_preferences(src, on_bad_row="skip")
    assert len(pairs) == 6 and report.skipped == {kind: 1} and report.rows_kept == 6


# --- prompts -------------------------------------------------------------------------------------


def test_prompts_as_text_or_messages(tmp_path):
    rows = [{"prompt": "1+1="}, {"prompt": msgs(("system", "Add."), ("user", "2+2="))},
            {"messages": msgs(("user", "3+3="))}]
    prompts, report = F.load_prompts(jsonl(tmp_path / "p.jsonl", rows))
    assert prompts == ["1+1=", "System: Add.\nUser: 2+2=\nAssistant: ", "User: 3+3=\nAssistant: "]
    assert not report.eventful
    prompts, _ = F.load_prompts(jsonl(tmp_path / "p.jsonl", rows[1:2]), tokenizer=_TemplateTok())
    assert prompts == ["<system>Add.<user>2+2=<assistant>"]


@pytest.mark.parametrize("bad,kind", [({"prompt": 3}, F.WRONG_TYPE), ({"prompt": "\n"}, F.EMPTY),
                                      ({"other": "x"}, F.MISSING), ({"prompt": [{"content": "x"}]}, F.MISSING),
                                      (["not", "an", "object"], F.WRONG_TYPE)])
def test_prompt_bad_rows_error_or_skip(tmp_path, bad, kind):
    src = jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, bad])
    with pytest.raises(DataError, match=f"p.jsonl row 2.*: {kind}"):
        F.load_prompts(src)
    assert F.load_prompts(src, on_bad_row="skip")[1].skipped == {kind: 1}


# --- prompt limit, holdout, task data ------------------------------------------------------------


def test_prompt_limit_truncates_from_the_left_or_drops_and_counts(tok):
    report = LoadReport("x", rows_read=3, rows_kept=3)
    out = F.apply_prompt_limit(["short", "0123456789", "abcdefghijklmnop"], tok, 8, "truncate", report)
    assert out == ["short", "23456789", "ijklmnop"]
    assert (report.truncated, report.dropped_too_long, report.rows_kept) == (2, 0, 3)
    assert "truncated 2 prompts" in report.summary()
    report = LoadReport("x", rows_read=3, rows_kept=3)
    examples = [SFTExample("short", "r"), SFTExample("0123456789", "r2"), PreferencePair("abcdefghi", "c", "r")]
    assert F.apply_prompt_limit(examples, tok, 8, "drop", report) == [SFTExample("short", "r")]
    assert (report.truncated, report.dropped_too_long, report.rows_kept) == (0, 2, 1)
    cut = F.apply_prompt_limit(examples[2:], tok, 3, "truncate")
    assert cut == [PreferencePair("ghi", "c", "r")]


def test_split_holdout_is_deterministic_and_disjoint():
    items = list(range(50))
    train, held = F.split_holdout(items, 0.2, seed=3)
    assert len(held) == 10 and sorted(train + held) == items and train == sorted(train)
    assert F.split_holdout(items, 0.2, seed=3) == (train, held)
    assert F.split_holdout(items, 0.2, seed=4)[1] != held
    assert F.split_holdout(items, 0.0, seed=0) == (items, [])
    assert F.split_holdout([1, 2], 0.01, seed=0)[1] != []  # a positive fraction holds out at least one
    assert len(F.split_holdout([1], 0.5, seed=0)[0]) == 1


def test_task_data_in_the_same_types():
    task = get_task("arithmetic", seed=0)
    sft = F.task_sft(task, 20, error_rate=0.0)
    assert len(sft) == 20 and all(isinstance(e, SFTExample) for e in sft)
    assert all(task.gold_score(e.prompt, e.response) == 1.0 for e in sft)
    prefs = F.task_preferences("arithmetic", 20)
    assert len(prefs) == 20 and all(task.gold_score(p.prompt, p.chosen) == 1.0 > task.gold_score(p.prompt, p.rejected)
                                    for p in prefs)


def test_files_that_are_not_what_they_claim_name_the_file_and_row(tmp_path):
    """Refused with one message naming the file (and, for a line, the row), never a traceback and
    never sent to a hub as a dataset name."""
    bad_utf8 = tmp_path / "p.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "1+1="}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl row 2: wrong type \(not valid JSON: not UTF-8 text at byte 12\)"):
        F.load_prompts(str(bad_utf8))
    assert F.load_prompts(str(bad_utf8), on_bad_row="skip")[0] == ["1+1="]
    fake_parquet = tmp_path / "p.parquet"
    fake_parquet.write_text('{"prompt": "this is JSON, not Parquet"}\n')
    with pytest.raises(DataError, match=r"p\.parquet: not a Parquet file"):
        F.load_prompts(str(fake_parquet))
    noise = tmp_path / "p.json"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"p\.json: not UTF-8 text"):
        F.load_prompts(str(noise))
    unknown = tmp_path / "p.tsv"
    unknown.write_text("prompt\n1+1=\n")
    with pytest.raises(DataError, match=r"p\.tsv: unknown format \(a local data file must end in \.jsonl, "
                                        r"\.json, \.parquet, \.csv\)"):
        F.load_prompts(str(unknown))
    with pytest.raises(FileNotFoundError, match="data file nowhere/p.csv does not exist"):
        F.load_prompts("./nowhere/p.csv")
