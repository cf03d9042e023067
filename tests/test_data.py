import pytest
import torch

from harness import data
from harness.errors import UserError


def test_pydoc_parts_are_disjoint_and_stable():
    a, b = data.load_corpus("pydoc"), data.load_corpus("pydoc")
    assert a == b
    assert len(a.eval_text) > 50_000 and len(a.calib_text) > 50_000
    from pydoc_data.topics import topics

    placed = [(text in a.eval_text, text in a.calib_text) for text in topics.values()]
    assert all(in_eval != in_calib for in_eval, in_calib in placed)  # each topic in exactly one part
    assert 0.3 < sum(e for e, _ in placed) / len(placed) < 0.7


def test_pycode_is_the_stdlib_source_split_by_module():
    import sysconfig
    from pathlib import Path

    corpus = data.load_corpus("pycode")
    sources = [p.read_text(encoding="utf-8", errors="replace")
               for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py")]
    placed = [(src in corpus.eval_text, src in corpus.calib_text) for src in sources if len(src) > 2000]
    assert len(placed) > 50 and all(in_eval != in_calib for in_eval, in_calib in placed)
    assert "def " in corpus.eval_text and corpus.eval_text not in data.load_corpus("pydoc").eval_text


def test_a_local_text_is_evaluated_whole_as_on_disk_and_halved_only_when_it_also_calibrates(tmp_path):
    path = tmp_path / "notes.txt"
    text = " = Title = \r\n\n" + "\n\n".join(f"paragraph {i} " * 20 for i in range(40)) + "\n \n"
    path.write_bytes(text.encode())
    assert data.load_corpus(str(path)).eval_text == text
    shared = data.load_corpus(str(path), shared=True)
    assert shared.eval_text and shared.calib_text and len(shared.eval_text) < len(text)
    assert set(shared.eval_text.split("\n\n")).isdisjoint(shared.calib_text.split("\n\n"))


def test_a_binary_file_is_refused_as_a_corpus(tmp_path):
    path = tmp_path / "ls"
    path.write_bytes(b"\x7fELF\x02\x01\x00\x00" * 10)
    with pytest.raises(UserError, match="binary"):
        data.load_corpus(str(path))


def test_wikitext2_reads_the_released_split_files_from_a_folder(tmp_path):
    for split, name in data.WIKITEXT2_SPLITS.items():
        (tmp_path / name).write_text(f" \n = {split} = \n \n text of {split} @-@ split \n")
    corpus = data.load_corpus("wikitext2:valid", {"wikitext2": str(tmp_path)})
    assert corpus.eval_text == (tmp_path / "wiki.valid.raw").read_text()
    assert corpus.calib_text == (tmp_path / "wiki.train.raw").read_text()
    assert "= test =" in data.load_corpus("wikitext2", {"wikitext2": str(tmp_path)}).eval_text
    (tmp_path / "wiki.test.raw").unlink()
    with pytest.raises(UserError, match="no wiki.test.raw"):
        data.load_corpus("wikitext2", {"wikitext2": str(tmp_path)})


def test_bos_is_added_once_before_the_whole_text_only_when_asked(tiny):
    _, tokenizer = tiny
    corpus = data.CorpusText("t", "some text " * 50, "")
    plain = data.tokenize(tokenizer, corpus, "eval", "none")
    with_bos = data.tokenize(tokenizer, corpus, "eval", "text")
    assert with_bos.ids.tolist() == [tokenizer.bos_token_id, *plain.ids.tolist()]
    assert (with_bos.bos, plain.bos) == (True, False) and with_bos.sha256 == plain.sha256
    assert data.tokenize(tokenizer, corpus, "eval", "auto").bos == data.adds_bos(tokenizer)


def test_unknown_corpus_says_what_to_use():
    with pytest.raises(UserError, match="unknown corpus 'nope': use one of pydoc"):
        data.load_corpus("nope")


def test_windows_are_non_overlapping_and_spread():
    ids = torch.arange(1000)
    all_windows = data.eval_windows(ids, 100, None)
    assert all_windows.shape == (10, 100) and torch.equal(all_windows.flatten(), ids)
    some = data.eval_windows(ids, 100, 3)
    assert some[:, 0].tolist() == [0, 400, 900]
    with pytest.raises(UserError, match="fewer than eval.seqlen"):
        data.eval_windows(ids, 2000, None)


def test_calibration_samples_are_seeded():
    ids = torch.arange(10_000)
    a, b = data.calibration_samples(ids, 8, 64, seed=1), data.calibration_samples(ids, 8, 64, seed=1)
    assert torch.equal(a, b) and a.shape == (8, 64)
    assert not torch.equal(a, data.calibration_samples(ids, 8, 64, seed=2))
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # contiguous windows of the text
    with pytest.raises(UserError, match="fewer than one sample"):
        data.calibration_samples(ids[:50], 8, 64, seed=1)


def test_tokenized_text_carries_its_hash(tiny):
    _, tokenizer = tiny
    corpus = data.load_corpus("pydoc")
    t = data.tokenize(tokenizer, corpus, "eval")
    assert t.n_tokens == len(corpus.eval_text.encode())  # byte tokenizer
    assert len(t.sha256) == 64 and t.describe()["tokens"] == t.n_tokens
