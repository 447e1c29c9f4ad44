"""``mim``: the LightningCLI entry point (``mim fit|validate|test|predict -c config.yaml``).

Any LightningModule / LightningDataModule can be named by ``class_path`` in a config; the classes of
``mim`` are imported here so short names work too (``--model MAE --data ImageDataModule``).
Every option is overridable on the command line (``--model.mask_ratio 0.6``).

Two checks run before any work (:class:`MimCLI`): checkpoints (``--ckpt_path``) are only ever loaded
with ``weights_only=True``, and a file whose pickle would run code is refused with one message
(:func:`mim.eval.encoders.read_checkpoint`); the run's output folders (``default_root_dir``, logger
and checkpoint folders) must be writable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Lightning 2.6 calls jsonargparse APIs that jsonargparse 4.49+ deprecates: not the user's concern.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

import mim.callbacks  # noqa: E402, F401  (imported so short class names resolve)
import mim.data  # noqa: E402, F401
import mim.eval  # noqa: E402, F401
import mim.features  # noqa: E402, F401
import mim.methods  # noqa: E402, F401
import mim.sae  # noqa: E402, F401
import mim.sae.data  # noqa: E402, F401
import mim.sae.module  # noqa: E402, F401
from mim.data import BadImageError, DatasetNotFoundError  # noqa: E402
from mim.errors import ConfigError, UserError  # noqa: E402
from mim.eval.encoders import read_checkpoint  # noqa: E402
from mim.export import check_writable  # noqa: E402

#: Errors whose message says all a user needs; shown without a traceback unless MIM_TRACEBACK=1.
USER_ERRORS = (UserError, DatasetNotFoundError, BadImageError)


def secure_checkpoint_loading(config: Any) -> None:
    """Make a subcommand's checkpoint loading safe, before Lightning reads ``ckpt_path``.

    ``weights_only`` is set to ``True`` (Lightning passes ``None`` to ``torch.load``, which a
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` environment turns into ``False``), and a ``ckpt_path``
    file is opened once with :func:`mim.eval.encoders.read_checkpoint` (memory-mapped: tensors are
    not read), so an unsafe or unreadable file gives one message instead of a traceback.

    Raises:
        ConfigError: ``--weights_only false``.
        UnsafeCheckpointError, EncoderLoadError: from :func:`~mim.eval.encoders.read_checkpoint`.
    """
    if "weights_only" in config:
        if config["weights_only"] is False:
            raise ConfigError(
                "mim loads checkpoints with weights_only=True only: weights_only=False would run any code a "
                "checkpoint's pickle names, and mim's checkpoints need nothing beyond tensors, numbers and "
                "strings. Fix: drop --weights_only false."
            )
        config["weights_only"] = True
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and not str(ckpt_path).startswith(("http://", "https://")) and Path(ckpt_path).is_file():
        read_checkpoint(ckpt_path, mmap=True)


def check_output_folders(trainer: Any) -> None:
    """Refuse a run whose ``default_root_dir``, logger folders or ``ModelCheckpoint`` folder cannot be
    written (:func:`mim.export.check_writable`), before the first step rather than at the first save.

    Raises:
        OutputError: the first unwritable folder, named with its cause.
    """
    fix = "choose a folder you can write with --trainer.default_root_dir DIR (and check the disk is not read-only)."
    folders = [("the run folder (default_root_dir)", trainer.default_root_dir)]
    for logger in trainer.loggers:
        folders.append((f"the {type(logger).__name__} folder", getattr(logger, "save_dir", None)))
    for callback in trainer.checkpoint_callbacks:
        folders.append(("the checkpoint folder (ModelCheckpoint dirpath)", getattr(callback, "dirpath", None)))
    seen = set()
    for what, folder in folders:
        if folder is None or "://" in str(folder) or str(folder) in seen:  # remote folders: not checked
            continue
        seen.add(str(folder))
        check_writable(folder, what, fix)


def find_last_checkpoint(trainer: Any) -> str | None:
    """The newest ``last*.ckpt`` of this run's checkpoint folders, for ``--ckpt_path last``.

    Lightning looks for ``last.ckpt`` only in the folder the *new* run would write (with a logger, a new
    ``version_N``), so a killed run would restart from scratch. This looks in every ``ModelCheckpoint``'s
    ``dirpath`` and in every ``checkpoints`` folder under the loggers' folders and ``default_root_dir``.
    Returns ``None`` when there is none (Lightning then warns and starts afresh).
    """
    roots = [Path(trainer.default_root_dir)]
    roots += [Path(logger.save_dir) for logger in trainer.loggers if getattr(logger, "save_dir", None)]
    found = [p for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None) and Path(cb.dirpath).is_dir()
             for p in Path(cb.dirpath).glob("last*.ckpt")]
    found += [p for root in roots if root.is_dir() for p in root.glob("**/checkpoints/last*.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


class MimCLI(LightningCLI):
    """``LightningCLI`` with :func:`secure_checkpoint_loading` (after parsing, before Lightning reads
    ``ckpt_path``) and :func:`check_output_folders` (after the trainer is built, before it runs)."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            secure_checkpoint_loading(self.config[subcommand])

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand is not None:
            check_output_folders(self.trainer)

    def before_fit(self) -> None:
        """``--ckpt_path last``: resume from :func:`find_last_checkpoint` (checked as any ``--ckpt_path``)."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last" and (last := find_last_checkpoint(self.trainer)):
            secure_checkpoint_loading({**config, "ckpt_path": last})
            config["ckpt_path"] = last


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, execute) the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    return MimCLI(
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def user_error(err: BaseException) -> BaseException | None:
    """The first user-facing error in ``err``'s cause chain (jsonargparse wraps the ones raised
    while it instantiates classes), or ``None``."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main() -> None:
    """Console script ``mim``: user errors print one message (no traceback) and exit with code 2."""
    try:
        cli_main()
    except Exception as err:
        cause = user_error(err)
        if cause is None or os.environ.get("MIM_TRACEBACK"):
            raise
        print(f"mim: error: {cause}\n(set MIM_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
