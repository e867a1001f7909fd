"""Errors meant for the user: the CLI prints their message (no traceback) and exits non-zero."""


class SPOError(Exception):
    """An error whose message says what went wrong and what to do about it."""

    exit_code = 1


class DataValidationError(SPOError):
    """The source data failed its Great Expectations suite (or could not be read at all)."""

    exit_code = 3


class ModelLoadError(SPOError):
    """A model id or path could not be loaded."""

    exit_code = 4


class NonFiniteError(SPOError):
    """Training produced NaN/inf too many times in a row."""

    exit_code = 5


class MissingExtraError(SPOError):
    """An optional dependency (pip extra) is not installed."""

    exit_code = 6

    def __init__(self, what: str, extra: str, module: str, problem: str = "which is not installed"):
        if extra == "metrics":
            # A plain `pip install spo[metrics]` would pull PyPI's (CUDA) torchvision beside a CPU torch.
            how = (
                "make install EXTRAS=dev,metrics  (or: bash scripts/install_metrics.sh .venv/bin/pip, which "
                "installs the torchvision build matching your torch)"
            )
        else:
            how = f"pip install 'spo[{extra}]'  (or: .venv/bin/pip install -e '.[{extra}]')"
        super().__init__(f"{what} needs the optional package {module!r}, {problem}. Install it with: {how}")
        self.extra = extra
