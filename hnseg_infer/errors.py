"""The error hierarchy. Every message names the file or value at fault and what to do about it."""


class HnsegError(Exception):
    """Base of all errors the product reports to the user (exit code 2, one line on stderr)."""


class InputError(HnsegError):
    """The input images are missing, unreadable or unusable."""


class MissingPetError(InputError):
    """No PET image where one was looked for. A recipe that allows CT-only input ("pet_optional") runs without it;
    for any other recipe this is the error the user sees."""

    def __init__(self, message: str, *, folder=None):
        super().__init__(message)
        self.folder = folder  # where the PET was looked for


class RecipeError(HnsegError):
    """The weights folder or its recipe.json is missing or invalid."""


class ModelError(HnsegError):
    """A model file cannot be loaded or run."""


class OutputError(HnsegError):
    """The output failed its final validation or could not be written."""


class ExportError(HnsegError):
    """A trained model could not be exported, or its export failed the proof of equivalence."""


class Terminated(BaseException):
    """The platform's SIGTERM (grand-challenge sends it at the time limit). A BaseException, as KeyboardInterrupt,
    so that no handler of Exception swallows it: the adapters catch it, leave nothing under the output folder,
    write the report with status "terminated" and exit 143."""
