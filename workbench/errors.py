"""Exceptions a user can act on.

Every error the workbench raises on bad input derives from :class:`WorkbenchError` and carries a
message that says what to do. The CLI prints ``str(error)`` as one line and exits with code 2; the
Python API lets the specific subclass propagate so notebooks can catch exactly what they expect.
"""


class WorkbenchError(Exception):
    """Base class: a user-facing problem with a one-line, actionable message."""


class UnknownModelError(WorkbenchError, LookupError):
    """The model spec names no built-in model, local directory, GGUF file or hub model."""


class ModelNotInstalledError(WorkbenchError, ModuleNotFoundError):
    """A built-in model's package is missing; the message says which pip command installs it."""


class ModelLoadError(WorkbenchError):
    """The model files exist but could not be loaded (corrupt, wrong format, no network)."""


class PromptSetError(WorkbenchError, ValueError):
    """A prompt file is missing, empty or not in a supported format."""


class RunFileError(WorkbenchError):
    """A run or cache file cannot be used (missing, foreign, truncated, other schema)."""


class CorruptFileError(RunFileError):
    """A workbench file whose content no longer matches the checksum it was sealed with
    (truncated, or changed after it was written): nothing of it is read."""


class ForeignFileError(RunFileError):
    """The file is HDF5 (or not) but was not written by the workbench."""


class SchemaVersionError(RunFileError):
    """The file was written by a workbench with another schema version."""


class RunMismatchError(RunFileError):
    """A run file belongs to another model than the one at hand (``check_run_model`` in
    ``workbench.store``), or the parts of a data-parallel scan do not fit together."""


class OutputError(WorkbenchError):
    """An output path cannot be written: a directory where a file goes (or the reverse), a
    file where a parent directory goes, or a place this process may not write
    (``workbench.atomic.check_output``, checked before any work starts)."""


class OutputLockedError(OutputError):
    """Another process is writing the same output (``workbench.atomic.writer_lock``); the
    message names the lock file and the process that holds it."""


class DeviceError(WorkbenchError, ValueError):
    """The requested device is no device name, or this machine (or this torch build) does not
    have it (``workbench.placement.resolve``)."""


class DistributedError(WorkbenchError):
    """A data-parallel or multi-device run cannot go on (a rank failed, devices do not fit)."""


class ShapeError(WorkbenchError, ValueError):
    """A tensor or array has the wrong shape; the message names the expected one."""


class MissingEntryError(WorkbenchError, KeyError):
    """A run or cache file holds no score, statistic, label or hook of the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TaskBuildError(WorkbenchError, ValueError):
    """A task cannot be made: its name is not in the task registry (``workbench.tasks``), an
    option is unknown, missing or of the wrong type, or its prompts cannot be built for this
    tokenizer (e.g. too few of the IOI names are single tokens)."""


class ProbeOptionError(WorkbenchError, ValueError):
    """A probe option (``scan(..., options=...)``, ``--option KEY=VALUE``) has a bad value, or the
    probe cannot measure these inputs on the requested capture path."""


class InterventionError(WorkbenchError, ValueError):
    """An intervention spec or evaluation request is invalid (unknown kind, head out of range,
    missing prompt variant); the message names what to change."""


class CaptureError(WorkbenchError, ValueError):
    """A capture path cannot run this request: an unknown path name, or an attention variant,
    mask or input the path cannot reproduce exactly (the message names the path that can)."""
