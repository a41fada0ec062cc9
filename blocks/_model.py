"""What every model block shares: its family name, its server, its version, and the plumbing
between "a list of inputs, some unsendable" and "one outcome per input".

A new model family is one module with a `ModelBlock` subclass that sets ``family`` (the name
used in route prefixes, flow parameters, run names, cache keys and table columns) and is
imported by the package's ``__init__``; `model_class` then finds it by that name.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from prefect.blocks.core import Block
from pydantic import Field

from ._resize import ResizePlan, plan_for, resize_settings
from ._resize import prepare_images as prepare_resized
from .exceptions import InferenceError, InvalidInputError
from .server import InferenceServer

if TYPE_CHECKING:
    from ._http import InferenceHTTP

__all__ = ["ModelBlock", "Outcome", "Prepared", "model_class", "model_families", "require_items"]

T = TypeVar("T")
#: One input's result, or the `InferenceError` that prevented it (n inputs in, n outcomes out).
Outcome = Any
#: An input encoded as the server's image object, or the error that makes it unsendable.
Prepared = dict[str, str] | InvalidInputError

_FAMILIES: dict[str, type[ModelBlock]] = {}


class ModelBlock(Block, ABC):
    """Base of the model blocks: ``family`` names the model family once, for everything.

    Subclasses set ``family`` and give ``version`` its default and description.
    """

    family: ClassVar[str]

    server: InferenceServer = Field(default_factory=InferenceServer, description="The inference server to call.")
    version: str = Field(description="Model version.")
    client_resize: bool = Field(
        default=True,
        description="Resize big photos (over 256 KiB or 1 MP, and over 1.5× the model's input) on the client "
        "before sending them (far fewer bytes, much faster; OWLv2 boxes are mapped back to the original); smaller "
        "images always go untouched, and off sends every image untouched.",
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("family")
        if family is not None:
            registered = _FAMILIES.setdefault(family, cls)
            if registered is not cls and not issubclass(cls, registered):
                raise TypeError(f"model family {family!r} is already {registered.__name__}")

    @property
    def _engine(self) -> InferenceHTTP:
        return self.server.engine

    @property
    def label(self) -> str:
        """Family and version, e.g. ``"clip ViT-B-16"``: run names and logs."""
        return f"{self.family} {self.version}"

    def identity(self) -> dict[str, Any]:
        """What identifies this model's results in a cache key: family, version and every setting
        that changes results (the client-side resize); never the server or its key."""
        return {"family": self.family, "version": self.version, **resize_settings(self.client_resize)}

    def resize_plan(self) -> ResizePlan | None:
        """How images are resized on the client before sending; None when they go untouched."""
        return plan_for(self.family, self.version) if self.client_resize else None

    def prepare_images(self, images: Any, field: str = "images") -> list[Prepared]:
        """Each image as the server's image object (resized when big), or the error that makes it unsendable."""
        prepared = prepare_resized(require_items(images, field, "images"), field, self.resize_plan())
        return [p if isinstance(p, InvalidInputError) else p.image for p in prepared]

    @staticmethod
    async def _send_prepared(
        prepared: Sequence[T | InvalidInputError], send: Callable[[list[T]], Awaitable[list[Outcome]]]
    ) -> list[Outcome]:
        """Send the sendable inputs; merge their outcomes back among the unsendable ones, in order."""
        sent = iter(await send([p for p in prepared if not isinstance(p, InvalidInputError)]))
        return [p if isinstance(p, InvalidInputError) else next(sent) for p in prepared]

    @staticmethod
    def _raise_first(outcomes: Sequence[T]) -> list[T]:
        """The outcomes, once none is an error; else the first error is raised."""
        for outcome in outcomes:
            if isinstance(outcome, InferenceError):
                raise outcome
        return list(outcomes)


def model_class(family: str, field: str = "model") -> type[ModelBlock]:
    """The model block of a family name — or of its class's name, which tables written before family
    names carry (``"Clip"``, ``"PerceptionEncoder"``).

    Raises:
        InvalidInputError: naming ``field``, for an unknown family.
    """
    found = _FAMILIES.get(family) if isinstance(family, str) else None
    if found is None:
        found = next((cls for cls in _FAMILIES.values() if cls.__name__ == family), None)
    if found is None:
        raise InvalidInputError(field, f"expected one of {sorted(_FAMILIES)}, got {family!r}")
    return found


def model_families() -> dict[str, type[ModelBlock]]:
    """Every registered family name and its block class."""
    return dict(_FAMILIES)


def require_items(items: Any, field: str, kind: str) -> list[Any]:
    """A non-empty list from a sequence argument; a lone str/bytes/path is a mistake, not a list."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InvalidInputError(field, f"expected a list of {kind}, got {type(items).__name__}")
    if len(items) == 0:
        raise InvalidInputError(
            field, f"expected at least one {kind[:-1] if kind.endswith('s') else kind}, got an empty list"
        )
    return list(items)
