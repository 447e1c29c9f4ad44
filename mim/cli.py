"""``mim``: the LightningCLI entry point (``mim fit|validate|test|predict -c config.yaml``).

Any LightningModule / LightningDataModule can be named by ``class_path`` in a config; the classes of
``mim`` are imported here so short names work too (``--model MAE --data ImageDataModule``).
Every option is overridable on the command line (``--model.mask_ratio 0.6``).
"""

from __future__ import annotations

import os
import sys

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
from mim.errors import UserError  # noqa: E402

#: Errors whose message says all a user needs; shown without a traceback unless MIM_TRACEBACK=1.
USER_ERRORS = (UserError, DatasetNotFoundError, BadImageError)


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, execute) the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    return LightningCLI(
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
