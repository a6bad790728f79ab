"""Every `kdcache` command given bad input: one or two lines naming what and where on stderr,
exit code 2, no traceback (and `--debug` shows it). Nothing already written is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.cli import main
from pipeline.capture.corpus import CorpusError


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "bad_utf8.txt").write_bytes(b"hello \xff\xfe world\n")
    (root / "empty.txt").write_bytes(b"")
    return root


def _cache_config(root: Path, corpus: str, teacher: Path | None = None, **extra) -> Path:
    cfg = {"store": str(root / f"store-{corpus}"), "corpus": {"kind": "files", "paths": [str(root / corpus)]}, **extra}
    if teacher is not None:
        cfg["teacher"] = {"name": str(teacher)}
    path = root / f"{corpus}-{len(extra)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _user_error(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith(f"kdcache {argv[0]}: error: ")
    for text in expected:
        assert text in err, err
    return err


def test_verify_and_inspect_name_the_missing_store(capsys, tmp_path):
    _user_error(capsys, ["verify", str(tmp_path / "nowhere")], "no kdcache store", "nowhere")
    _user_error(capsys, ["inspect", str(tmp_path / "nowhere")], "no kdcache store")


def test_plan_bad_utf8_empty_file_unknown_key_missing_config(capsys, bad, tiny_teacher_dir):
    _user_error(capsys, ["plan", str(_cache_config(bad, "bad_utf8.txt", tiny_teacher_dir))],
                "bad_utf8.txt", "not valid UTF-8 at byte offset 6")
    _user_error(capsys, ["plan", str(_cache_config(bad, "empty.txt", tiny_teacher_dir))], "empty.txt", "empty file")
    _user_error(capsys, ["plan", str(_cache_config(bad, "empty.txt", tiny_teacher_dir, row_lenght=64))], "row_lenght")
    _user_error(capsys, ["plan", str(bad / "missing.yaml")], "missing.yaml")
    _user_error(capsys, ["plan", str(_cache_config(bad, "empty.txt")), "--set", "row_length"], "--set expects KEY=VALUE")


def test_cache_plain_and_flow_paths_give_one_line(capsys, bad, tiny_teacher_dir):
    config = str(_cache_config(bad, "empty.txt", tiny_teacher_dir))
    _user_error(capsys, ["cache", config, "--no-flow"], "empty.txt")
    _user_error(capsys, ["cache", config], "empty.txt")  # raised inside the Prefect flow


def test_train_eval_self_distill_tokenizer_serve_demo(capsys, bad, tmp_path):
    train = tmp_path / "train.yaml"
    train.write_text(yaml.safe_dump({"store": str(tmp_path / "no-store"), "out": str(tmp_path / "run")}))
    _user_error(capsys, ["train", str(train), "--no-flow"], "no kdcache store", "no-store")
    evaluation = tmp_path / "eval.yaml"
    evaluation.write_text(yaml.safe_dump({"store": str(tmp_path / "s"), "out": str(tmp_path / "e"), "modles": {}}))
    _user_error(capsys, ["eval", str(evaluation), "--no-flow"], "modles")
    _user_error(capsys, ["self-distill", str(tmp_path / "none.yaml"), "--no-flow"], "none.yaml")
    _user_error(capsys, ["tokenizer", str(tmp_path / "no-store"), "--out", str(tmp_path / "tok")], "no kdcache store")
    _user_error(capsys, ["serve", str(_cache_config(bad, "empty.txt")), "--interval", "5", "--set", "oops"], "KEY=VALUE")
    (tmp_path / "a-file").write_text("x")
    _user_error(capsys, ["demo", "--out", str(tmp_path / "a-file")], "a-file", "not a folder")
    _user_error(capsys, ["demo", "--tokens", "0"], "--tokens")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tok").exists()  # nothing written


def test_debug_shows_the_traceback(bad, tiny_teacher_dir):
    """With --debug the error propagates (Python prints its traceback and exits 1)."""
    with pytest.raises(CorpusError, match="not valid UTF-8 at byte offset 6"):
        main(["--debug", "plan", str(_cache_config(bad, "bad_utf8.txt", tiny_teacher_dir))])
