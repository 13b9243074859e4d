"""The coqui tests run in the coqui venv (`make coqui-venv`, run by `make test`): coqui-tts needs
a torch/torchaudio pair that does not load beside the main venv's CPU torch. In an
environment without the coqui-tts distribution this folder is not collected; where it is
installed, a broken import fails the tests loudly instead of hiding them."""

from importlib.metadata import PackageNotFoundError, version

try:
    version("coqui-tts")
except PackageNotFoundError:
    collect_ignore_glob = ["test_*.py"]
