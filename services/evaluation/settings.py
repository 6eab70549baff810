"""What `cbir evaluate` reads from the environment (`CBIR_*`, and a `.env` file as `cbir serve` does)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from services.common.settings import BaseCbirSettings


class EvaluationSettings(BaseCbirSettings):
    """The defaults of the options a command line leaves out; a flag given wins. Unset paths are
    `None`, so the report's reproduction line names only the variables that were set."""

    model_dir: Path | None = Field(None, description="model bundle (default: the shipped one)")
    data_dir: Path | None = Field(
        None, description="collection root with train/ and test/ (default: data/cifar10, else ../shared/cifar10)"
    )
    state_dir: Path | None = Field(None, description="the embedded store searched by --against-store")
    eval_api_key: SecretStr | None = Field(None, description="X-API-Key sent to the search API with --url")

    def reproduction_env(self) -> dict[str, str]:
        """The `CBIR_*` paths in force, as environment assignments that remake them."""
        paths = {"CBIR_MODEL_DIR": self.model_dir, "CBIR_DATA_DIR": self.data_dir, "CBIR_STATE_DIR": self.state_dir}
        return {name: str(value) for name, value in paths.items() if value is not None}
