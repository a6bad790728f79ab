"""Which folder a teacher name points at, so a kdcache student can teach the next store.

A trained student lives in its run folder ``<out>``: ``<out>/model/`` (``save_pretrained`` plus
its tokenizer) next to ``<out>/checkpoint.pt``. Self-distillation (born-again networks) caches
such a student as the teacher of a new store, and users name either folder, so ``<out>`` is
resolved to ``<out>/model`` here, before :func:`pipeline.capture.teacher.load_teacher` sees it.

Provenance must not depend on where a run happened to live: the store records a student teacher
by its run folder's name (``student1``, not ``model`` or an absolute path); the weights digest,
computed from the bytes of ``model/*.safetensors``, is what identifies it.

A local folder that holds no model is refused here with its path and what is missing, instead
of surfacing as a transformers error deep inside the teacher pass.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.capture.teacher import DEFAULT_ALIASES

MODEL_DIR = "model"  # where the trainer saves a finished student inside its run folder
CHECKPOINT = "checkpoint.pt"  # pipeline.train.trainer.CHECKPOINT; not imported: that pulls the loss stack in
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


class NotAModelError(FileNotFoundError):
    """A local teacher folder holds no loadable model (names the folder and what is missing)."""


def _weight_files(folder: Path) -> list[Path]:
    return [f for pattern in _WEIGHTS for f in folder.glob(pattern)]


def resolve_teacher(name: str) -> str:
    """The name to load: ``<out>`` → ``<out>/model`` for a kdcache student run folder.

    Anything that is not an existing local folder (``default``, a hub name, a ``.gguf`` file, a
    missing path) is returned unchanged: :func:`pipeline.capture.teacher.load_teacher` handles and names
    it. A local folder must hold ``config.json`` and weight files, else :class:`NotAModelError`.
    """
    path = Path(name).expanduser()
    if name.lower() in DEFAULT_ALIASES or not path.is_dir():
        return name
    if not (path / "config.json").is_file() and (path / MODEL_DIR).is_dir():
        path = path / MODEL_DIR
    elif not (path / "config.json").is_file() and (path / CHECKPOINT).is_file():
        raise NotAModelError(f"teacher folder {path} is a kdcache student run with a checkpoint but no "
                             f"{MODEL_DIR}/ folder: its training has not finished (train it to the end first)")
    missing = [what for what, ok in (("config.json", (path / "config.json").is_file()),
                                     ("weight files (*.safetensors, pytorch_model*.bin)", bool(_weight_files(path))))
               if not ok]
    if missing:
        raise NotAModelError(
            f"teacher folder {path} is not a model: no {' and no '.join(missing)}; name a Hugging Face model "
            f"folder, a kdcache student (its run folder or its {MODEL_DIR}/), a .gguf file, 'default' or a hub name")
    return name if path == Path(name).expanduser() else str(path)


def student_run(folder: str | Path) -> Path | None:
    """The run folder ``<out>`` when ``folder`` is a kdcache student's ``<out>/model``, else None."""
    path = Path(folder).expanduser().resolve()
    if path.name == MODEL_DIR and (path.parent / CHECKPOINT).is_file():
        return path.parent
    return None


def teacher_label(source: str, loaded_name: str) -> str:
    """The teacher's name in a store's provenance (part of its fingerprint).

    A kdcache student: its run folder's name. Another local path: its last component (the
    rule stores made before students could teach were fingerprinted with, kept unchanged).
    Anything else (``smollm2-135m-instruct``, a hub name): the name the loader reports.
    """
    run = student_run(source) if Path(source).expanduser().is_dir() else None
    if run is not None:
        return run.name
    name = str(loaded_name)
    return name.rstrip("/").rsplit("/", 1)[-1] if "/" in name and Path(name).exists() else name
