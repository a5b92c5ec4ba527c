"""The project's error types: a user mistake (bad config, data, file or checkpoint) raises a
`UserError` whose message names the field or file and what was expected. Command-line tools print
it as one line and exit with status 2 (`mgd_jax.tools.cli`); anything else is a bug and keeps its
traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message says which field / file and what to do."""


class ConfigError(UserError):
    """An invalid config field (the message starts with `config.<field>`)."""


class DataError(UserError):
    """Bad or missing data: the message names the file / id and what was expected."""


class WeightImportError(UserError):
    """A PyTorch checkpoint that does not fit the model, or is not a readable checkpoint."""


class ExportError(UserError):
    """A network directory (export, teacher, ImageNet init) that is missing, damaged or does not
    fit what it is used for."""


class CheckpointError(UserError):
    """A checkpoint write that failed (disk full, no permission), or no readable checkpoint."""


class DivergedError(UserError):
    """A non-finite loss or gradient stopped the run (the message names the step and the last
    good checkpoint)."""


class WorkdirInUseError(UserError):
    """Another run holds the workdir's lock (the message names it: host, pid, start)."""


class WriteError(UserError):
    """A write into the workdir failed (disk full, file size limit, storage gone): the message
    names the file, the step whose write failed and the intact checkpoints."""
