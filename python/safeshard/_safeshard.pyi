"""Type stubs of the native extension (checked against it by ``mypy.stubtest`` in CI)."""

from collections.abc import Callable
from os import PathLike
from typing import Any, final

__all__ = [
    "SafeshardError",
    "NativePlan",
    "NativeRank",
    "NativeArena",
    "NativeCheckpoint",
    "load_slices",
    "cli_main",
    "error",
    "check_share",
    "launch_env",
    "launcher_variables",
    "synth",
    "synth_presets",
    "live_arenas",
    "__version__",
]

__version__: str

class SafeshardError(ValueError):
    """Every safeshard failure; ``str(e)`` is the CLI's one-line message."""

    kind: str
    exit_code: int
    # Only on a timeout: the phase and the ranks that did not arrive.
    phase: str
    missing: list[int]

@final
class NativeArena:
    def __dlpack__(
        self,
        *,
        stream: Any | None = None,
        max_version: Any | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def address(self) -> int: ...
    @property
    def refcount(self) -> int: ...

@final
class NativeRank:
    @property
    def rank(self) -> int: ...
    def tensors(self) -> list[tuple[str, str, tuple[int, ...], int, int]]: ...
    @property
    def aliases(self) -> list[tuple[str, str]]: ...
    def arena(self) -> NativeArena: ...
    def stats(self) -> dict[str, Any]: ...
    def digest(self) -> str: ...

@final
class NativePlan:
    def __new__(
        cls,
        path: str | PathLike[str],
        tp: int,
        pp: int,
        dp: int,
        ep: int,
        spec: str | None = None,
        overrides: list[str] = ...,
        pp_layers: list[int] | None = None,
        names: str = "checkpoint",
    ) -> NativePlan: ...
    @property
    def world_size(self) -> int: ...
    @property
    def hash(self) -> str: ...
    @property
    def spec(self) -> str: ...
    @property
    def warnings(self) -> list[str]: ...
    @property
    def topology(self) -> tuple[int, int, int, int]: ...
    def to_json(self) -> str: ...
    def rank_info(self, rank: int) -> dict[str, Any]: ...
    def load(
        self,
        rank: int,
        io: str = "auto",
        threads: int | None = None,
        progress: Callable[[int], object] | None = None,
        node_ranks: list[int] | None = None,
    ) -> NativeRank: ...
    def load_into(
        self,
        rank: int,
        out: Any,
        io: str = "auto",
        threads: int | None = None,
        progress: Callable[[int], object] | None = None,
        node_ranks: list[int] | None = None,
    ) -> NativeRank: ...
    def load_scattered(
        self,
        rank: int,
        into: list[tuple[str, Any]],
        io: str = "auto",
        threads: int | None = None,
        progress: Callable[[int], object] | None = None,
        node_ranks: list[int] | None = None,
    ) -> NativeRank: ...
    def load_shared(
        self,
        comm: Any,
        share: str | None = None,
        io: str = "auto",
        threads: int | None = None,
        per_node: bool = False,
        round_bytes: int = 1073741824,
        progress: Callable[[int], object] | None = None,
        timeout: float | None = 600.0,
    ) -> NativeRank: ...

@final
class NativeCheckpoint:
    def __new__(cls, path: str | PathLike[str]) -> NativeCheckpoint: ...
    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]: ...
    @property
    def root(self) -> str: ...

def load_slices(
    checkpoint: NativeCheckpoint | None,
    comm: Any | None,
    requests: list[tuple[str, str, list[list[tuple[int, int]]]]],
    into: list[tuple[str, Any]],
    precheck: str | None = None,
    share: str = "none",
    io: str = "auto",
    threads: int | None = None,
    timeout: float = 600.0,
    round_bytes: int = 1073741824,
) -> NativeRank: ...
def cli_main(argv: list[str]) -> int: ...
def error(kind: str, message: str) -> SafeshardError: ...
def check_share(share: str) -> None: ...
def launch_env() -> tuple[str, int, int, int] | None: ...
def launcher_variables() -> list[tuple[str, str, str, str]]: ...
def synth(
    dir: str | PathLike[str],
    preset: str,
    *,
    sparse: bool = False,
    layers: int | None = None,
    seed: int = 0,
) -> int: ...
def synth_presets() -> list[str]: ...
def live_arenas() -> int: ...
