"""Prompt sources (text, JSONL, parquet, a ``datasets`` folder, a Python function) and the per-prompt metadata they
carry to the rewards: each kind loaded from tiny files, bad sources in one sentence, the metadata through the reward
server and into the OCR reward's target, and end to end through ``diffrl train``."""
import copy
import json
import pickle
import sys
import threading

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import prompt_sources_helpers as helpers
import rewards
import rewards.ocr
from diffrl import cli
from diffrl.prompts import Prompt, PromptError, PromptStream, eval_prompts, load_prompts
from rewards.remote import decode_request, encode_request, make_server
from tests_helpers import ROOT, TINY

TREE = str(ROOT / "configs" / "tiny_shapes_tree.yaml")
GENEVAL = [  # GenEval's metadata format (tag, prompt, include): each line is its prompt's metadata as it stands
    {"tag": "counting", "prompt": "a photo of two cats", "include": [{"class": "cat", "count": 2}]},
    {"tag": "colors", "prompt": "a photo of a red apple", "include": [{"class": "apple", "count": 1, "color": "red"}]},
    {"tag": "single_object", "prompt": "a photo of a bench", "include": [{"class": "bench", "count": 1}]},
]
TABLE = [  # one schema for every row, as a parquet file or an Arrow table has
    {"caption": 'a shop sign saying "open"', "text": "OPEN 24H", "id": 0, "include": [{"class": "sign", "count": 1}]},
    {"caption": "a neon sign in a window", "text": "Rosa's Bakery", "id": 1, "include": []},
    {"caption": "a street name plate", "text": "Elm St", "id": 2, "include": [{"class": "plate", "count": 2}]},
]


@pytest.fixture
def pa():
    """pyarrow (the ``data`` and ``test`` extras), with its parquet and ipc parts."""
    pytest.importorskip("pyarrow")
    import pyarrow.ipc  # noqa: F401 - pa.ipc
    import pyarrow.parquet

    return pyarrow


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(pa, path, rows, schema=None):
    pa.parquet.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))
    return path


def write_like_save_to_disk(pa, folder, rows, shards=2, schema=None):
    """A folder laid out as ``datasets.Dataset.save_to_disk`` writes one: the rows split over ``shards`` (1 or 2)
    Arrow stream files ``data-0000i-of-0000n.arrow`` that ``state.json``'s ``_data_files`` lists in order, and
    ``dataset_info.json``."""
    folder.mkdir()
    schema = schema or pa.Table.from_pylist(rows).schema
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    cut = (len(rows) + 1) // 2
    for name, part in zip(names, [rows[:cut], rows[cut:]] if shards == 2 else [rows]):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(pa.Table.from_pylist(part, schema=schema))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "t", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def texts_and_metadata(prompts):
    assert all(isinstance(p, Prompt) for p in prompts)
    return [str(p) for p in prompts], [dict(p.metadata) for p in prompts]


def test_a_prompt_is_its_text_with_read_only_metadata():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 2}]}
    p = Prompt("a photo of two cats", meta)
    assert p == "a photo of two cats" and hash(p) == hash("a photo of two cats")
    assert {p: 0}["a photo of two cats"] == 0 and "a photo of two cats" in {p}
    meta["tag"] = "changed"  # the prompt holds its own copy
    assert p.metadata["tag"] == "counting"
    with pytest.raises(TypeError):
        p.metadata["tag"] = "x"
    with pytest.raises(AttributeError):
        p.metadata = {}
    # what str operations give back is plain text: the metadata stays with the object
    assert [type(x) for x in (f"{p}", p + "!", p.strip(), str(p))] == [str] * 4
    batch = [p, Prompt("a dog")]
    for kept in (batch[1:], batch * 2, list(batch), [q for q in batch for _ in range(3)], copy.deepcopy(batch),
                 pickle.loads(pickle.dumps(batch))):
        assert all(isinstance(q, Prompt) for q in kept)
    assert pickle.loads(pickle.dumps(p)).metadata == {"tag": "counting", "include": [{"class": "cat", "count": 2}]}
    assert Prompt("plain").metadata == {}


def test_a_text_file_and_a_jsonl_file_load_with_their_rows(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  two blue squares \n")
    assert texts_and_metadata(load_prompts(str(tmp_path / "p.txt"))) == (["a red circle", "two blue squares"], [{}, {}])
    jsonl = write_jsonl(tmp_path / "geneval.jsonl", GENEVAL)
    assert texts_and_metadata(load_prompts(str(jsonl))) == ([r["prompt"] for r in GENEVAL], GENEVAL)
    captions = write_jsonl(tmp_path / "captions.jsonl", TABLE)
    assert texts_and_metadata(load_prompts(f"{captions}:caption")) == ([r["caption"] for r in TABLE], TABLE)


def test_a_parquet_file_loads_by_its_default_or_named_column(pa, tmp_path):
    path = write_parquet(pa, tmp_path / "captions.parquet", TABLE)
    assert texts_and_metadata(load_prompts(f"{path}:caption")) == ([r["caption"] for r in TABLE], TABLE)
    plain = write_parquet(pa, tmp_path / "plain.parquet", [{"prompt": "a red circle", "seed": 7}])
    assert texts_and_metadata(load_prompts(str(plain))) == (["a red circle"], [{"prompt": "a red circle", "seed": 7}])


def test_a_datasets_folder_loads_its_shards_in_order(pa, tmp_path):
    folder = write_like_save_to_disk(pa, tmp_path / "captions", TABLE)
    assert texts_and_metadata(load_prompts(f"{folder}:caption")) == ([r["caption"] for r in TABLE], TABLE)


def test_a_folder_that_datasets_saved_loads(tmp_path):
    """The real ``save_to_disk``, where the ``datasets`` library is installed (it is not in the test extra)."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(TABLE).save_to_disk(str(tmp_path / "captions"))
    assert texts_and_metadata(load_prompts(f"{tmp_path / 'captions'}:caption")) == ([r["caption"] for r in TABLE],
                                                                                   TABLE)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TABLE)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(PromptError, match="holds a DatasetDict: name one split's folder .*splits/train"):
        load_prompts(str(tmp_path / "splits"))


def test_a_python_function_loads_strings_or_rows():
    assert texts_and_metadata(load_prompts("prompt_sources_helpers:texts")) == (helpers.texts(), [{}, {}])
    assert texts_and_metadata(load_prompts("prompt_sources_helpers:rows")) == ([r["prompt"] for r in helpers.ROWS],
                                                                               helpers.ROWS)


def test_the_stream_and_the_held_out_prompts_keep_each_rows_metadata(tmp_path):
    jsonl = write_jsonl(tmp_path / "geneval.jsonl", GENEVAL)
    by_text = {r["prompt"]: r for r in GENEVAL}
    held = eval_prompts(str(jsonl), 1)
    assert texts_and_metadata(held) == ([GENEVAL[0]["prompt"]], [GENEVAL[0]])
    drawn = PromptStream(str(jsonl), seed=0, exclude=held).at(3, 20)
    assert GENEVAL[0]["prompt"] not in drawn and len(drawn) == 20
    assert all(isinstance(p, Prompt) and p.metadata == by_text[p] for p in drawn)


def _bad_sources(pa, tmp_path):
    """``{case: (spec, what its one sentence says)}``."""
    string = pa.string()
    write_parquet(pa, tmp_path / "no_caption.parquet", [{"prompt": "x", "id": 1}])
    write_parquet(pa, tmp_path / "empty.parquet", [], schema=pa.schema([("prompt", string)]))
    write_parquet(pa, tmp_path / "null.parquet", [{"prompt": "x"}, {"prompt": None}])
    write_like_save_to_disk(pa, tmp_path / "empty_folder", [], shards=1, schema=pa.schema([("prompt", string)]))
    (tmp_path / "splits" / "train").mkdir(parents=True)
    (tmp_path / "splits" / "train" / "state.json").write_text("{}")
    (tmp_path / "splits" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (tmp_path / "plain_folder").mkdir()
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    (tmp_path / "p.txt").write_text("x\n")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, {"caption": "y"}])
    return {
        "missing column": (f"{tmp_path / 'no_caption.parquet'}:caption",
                           "has no column 'caption' (its columns: prompt, id)"),
        "empty parquet": (str(tmp_path / "empty.parquet"), "empty.parquet is empty"),
        "empty datasets folder": (str(tmp_path / "empty_folder"), "empty_folder is empty"),
        "a null prompt": (str(tmp_path / "null.parquet"), "row 1: a prompt must be non-empty text, got None"),
        "a DatasetDict": (str(tmp_path / "splits"), "holds a DatasetDict: name one split's folder"),
        "a folder of nothing": (str(tmp_path / "plain_folder"), "is not a datasets folder"),
        "unknown file type": (str(tmp_path / "p.csv"), "has an unknown file type (.csv)"),
        "a column of a text file": (f"{tmp_path / 'p.txt'}:caption", "is plain text, one prompt a line"),
        "a row without the key": (str(tmp_path / "p.jsonl"), "line 2: expected an object with a 'prompt' key"),
        "missing": (str(tmp_path / "nothing.parquet"), "does not exist"),
        "non-strings": ("prompt_sources_helpers:numbers", "item 0 is of type int, not a str or a dict"),
        "one string": ("prompt_sources_helpers:one_text", "returned a value of type str, not a list of str"),
        "not a function": ("prompt_sources_helpers:NOT_A_FUNCTION", "is of type list, not a function that returns"),
        "no module": ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        "no attribute": ("prompt_sources_helpers:nothing", "has no attribute 'nothing'"),
    }


CASES = ["missing column", "empty parquet", "empty datasets folder", "a null prompt", "a DatasetDict",
         "a folder of nothing", "unknown file type", "a column of a text file", "a row without the key", "missing",
         "non-strings", "one string", "not a function", "no module", "no attribute"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_source_is_one_sentence(case, pa, tmp_path):
    spec, says = _bad_sources(pa, tmp_path)[case]
    with pytest.raises(PromptError) as e:
        load_prompts(spec)
    assert says in str(e.value) and len(str(e.value).splitlines()) == 1


def test_without_pyarrow_a_table_source_names_the_extra(pa, tmp_path, monkeypatch):
    path = write_parquet(pa, tmp_path / "p.parquet", [{"prompt": "x"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(PromptError, match=r"is read with pyarrow, which is not installed: pip install 'diffrl\[data\]"):
        load_prompts(str(path))


@pytest.fixture
def recording_server():
    """A reward server whose reward records ``(type, text, metadata)`` of each prompt it gets."""
    seen = []

    def record(media, prompts):
        seen.extend((type(p), str(p), dict(getattr(p, "metadata", {}))) for p in prompts)
        return {"n": torch.ones(len(prompts))}

    srv = make_server(record, "tests:record", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    srv.shutdown()
    srv.server_close()


def test_metadata_reaches_a_reward_behind_a_server(recording_server):
    url, seen = recording_server
    remote = rewards.load("remote", url=url, batch_size=2)
    prompts = [Prompt(r["prompt"], r) for r in GENEVAL] + [Prompt("no metadata")]
    images = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(4)]
    assert remote(images, prompts)["n"].tolist() == [1.0] * 4
    assert seen == [(Prompt, r["prompt"], r) for r in GENEVAL] + [(Prompt, "no metadata", {})]
    seen.clear()
    remote(images[:2], ["plain", "text"])  # no metadata: the wire format is the one before metadata existed
    assert seen == [(str, "plain", {}), (str, "text", {})]


def test_the_wire_format_of_metadata():
    images = [Image.new("RGB", (4, 4))] * 2
    assert "metadata" not in encode_request(images, ["a", "b"])
    body = encode_request(images, [Prompt("a", {"text": "A"}), "b"])
    assert body["prompts"] == ["a", "b"] and body["metadata"] == [{"text": "A"}, {}]
    with pytest.raises(ValueError, match="the prompts' metadata cannot be sent to a reward server as JSON"):
        encode_request(images, [Prompt("a", {"when": object()}), "b"])
    for bad in ([{"text": "A"}], [{"text": "A"}, "B"], {"0": {}}):
        with pytest.raises(ValueError, match="'metadata' must be a list of JSON objects, one per prompt"):
            decode_request({**body, "metadata": bad})


def test_ocr_reads_its_target_from_the_metadata_else_from_the_quotes(monkeypatch):
    """An engine that always reads "HELLO": a target from the metadata wins over the prompt's quotes; without one
    the quotes give it; with neither the sample is NaN. "help" against "hello": 2 edits over 4 letters."""
    monkeypatch.setitem(rewards.ocr.ENGINES, "fixed", lambda image: "HELLO")
    ocr = rewards.load("ocr", engine="fixed")
    prompts = [Prompt('a sign that says "bye"', {"text": "hello"}), 'a sign that says "hello"',
               Prompt('a sign that says "help"', {"text": None}), Prompt("a sign", {"text": "help"}),
               Prompt("a sign", {"tag": "ocr"})]
    scores = ocr([Image.new("RGB", (8, 8))] * 5, prompts)["ocr"]
    assert scores[:4].tolist() == [1.0, 1.0, 0.5, 0.5] and torch.isnan(scores[4])
    by_word = rewards.load("ocr", engine="fixed", target_key="word")
    assert by_word([Image.new("RGB", (8, 8))], [Prompt('says "bye"', {"word": "hello"})])["ocr"].tolist() == [1.0]
    with pytest.raises(ValueError, match="the metadata 'text' of prompt 'a sign' is of type int, not the text to read"):
        ocr([Image.new("RGB", (8, 8))], [Prompt("a sign", {"text": 3})])


def test_rapidocr_scores_a_rendered_target_taken_from_the_metadata():
    pytest.importorskip("rapidocr")
    image = Image.new("RGB", (320, 96), "white")
    ImageDraw.Draw(image).text((12, 20), "DIFFRL", fill="black", font=ImageFont.load_default(size=40))
    ocr = rewards.load("ocr")
    scores = ocr([image, image], [Prompt("a poster", {"text": "DIFFRL"}), Prompt('a poster of "xyzzy"', {})])["ocr"]
    assert scores.tolist() == [1.0, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [1, 2])  # 2: each chunk of trees is scored in a thread while the next rolls out
def test_a_reward_sees_each_rows_metadata_through_diffrl_train(chunks, pa, tmp_path):
    """One step of ``diffrl train`` with training prompts from a parquet column and held-out prompts from a JSONL
    file: the recording reward scores 2 prompts x 1 tree x 2 leaves (TINY splits once, in two) in training and 2
    held-out prompts x 1 seed at the start and at the end, and every prompt it scores carries exactly its row."""
    train_file = write_parquet(pa, tmp_path / "train.parquet", TABLE)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", GENEVAL[:2])
    helpers.SEEN.clear()
    code = cli.main(["train", TREE, *TINY, "train.steps=1", "rewards={'prompt_sources_helpers:recording': 1.0}",
                     f"data.prompts={train_file}:caption", f"data.eval_prompts={eval_file}", "data.eval_size=2",
                     "data.eval_seeds=1", f"train.rollout_chunks={chunks}", "--out", str(tmp_path / "run")])
    assert code == 0
    rows = {r["caption"]: r for r in TABLE} | {r["prompt"]: r for r in GENEVAL[:2]}
    assert helpers.SEEN and all(text in rows and meta == rows[text] for text, meta in helpers.SEEN)
    trained = [text for text, _ in helpers.SEEN if text in {r["caption"] for r in TABLE}]
    held_out = [text for text, _ in helpers.SEEN if text in {r["prompt"] for r in GENEVAL}]
    assert len(trained) == 4 and held_out == [r["prompt"] for r in GENEVAL[:2]] * 2
