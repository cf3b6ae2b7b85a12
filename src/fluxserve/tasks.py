"""What a task is: its record, its statuses, and the legal moves between them."""

from __future__ import annotations

import secrets
import string
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

# The wire's words live in protocol, which the client shares; named here too.
from fluxserve.protocol import CALLBACK_EVENTS as CALLBACK_EVENTS
from fluxserve.protocol import EDIT_MODELS as EDIT_MODELS
from fluxserve.protocol import MODELS as MODELS
from fluxserve.protocol import OUTPUT_FORMATS as OUTPUT_FORMATS
from fluxserve.protocol import TERMINAL_EVENTS as TERMINAL_EVENTS
from fluxserve.protocol import TaskStatus as TaskStatus

# Every status write is checked against this table: the store makes each one with
# `_move` (store/queue.py), which refuses any other and names the source status
# in its WHERE clause, so a task leaves each status once.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.NOT_STARTED: frozenset({TaskStatus.RUNNING, TaskStatus.FAILED}),
    # running -> not_started: a lost worker's task handed back to the queue.
    TaskStatus.RUNNING: frozenset({TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.NOT_STARTED}),
    TaskStatus.FINISHED: frozenset(),
    TaskStatus.FAILED: frozenset(),
}


def can_move(source: TaskStatus, target: TaskStatus) -> bool:
    """Whether a task may go from `source` to `target`."""
    return target in TRANSITIONS[source]


_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_task_id(now: float | None = None) -> str:
    """`task-unified-<unix seconds>-<8 of [a-z0-9]>`, as the hosted API makes them."""
    seconds = int(time.time() if now is None else now)
    # One draw for all 8 characters: each draw from the system's random source
    # is a system call, and this runs on every submit.
    number = secrets.randbelow(len(_ID_ALPHABET) ** 8)
    suffix = []
    for _ in range(8):
        number, digit = divmod(number, len(_ID_ALPHABET))
        suffix.append(_ID_ALPHABET[digit])
    return f"task-unified-{seconds}-{''.join(suffix)}"


def new_event_id() -> str:
    """A callback event's id (`webhook-id`): the same on every retry of the event."""
    return f"evt_{secrets.token_hex(12)}"


def format_time(epoch: float) -> str:
    """UTC `YYYY-MM-DDTHH:MM:SS`, no zone suffix: the wire's time format."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass(frozen=True)
class BflOptions:
    """What a task submitted through Black Forest Labs' wire (docs/bfl-api.md) keeps
    of it: the path it came through, the fields fluxserve's own engines do not use,
    and the secret its webhook is signed with."""

    path: str
    safety_tolerance: int = 2
    prompt_upsampling: bool = False
    webhook_secret: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA a task asks for: by `name` (the operator's) or by `url`, at `scale`."""

    name: str | None = None
    url: str | None = None
    scale: float = 1.0

    @property
    def label(self) -> str:
        """How messages and the status data name it."""
        return self.name if self.name is not None else str(self.url)

    def to_json(self) -> dict[str, Any]:
        source = {"name": self.name} if self.name is not None else {"url": self.url}
        return {**source, "scale": self.scale}


@dataclass(frozen=True)
class TaskInput:
    """The validated `input` of a submitted task."""

    prompt: str
    size: str
    resolution: str
    image_urls: tuple[str, ...] = ()
    seed: int | None = None
    output_format: str = "png"
    steps: int | None = None
    guidance: float | None = None
    # The output's pixel size when asked for exactly (BFL's width and height);
    # otherwise `size` and `resolution` choose it.
    width: int | None = None
    height: int | None = None
    bfl: BflOptions | None = None
    loras: tuple[LoraSpec, ...] = ()

    @property
    def batch_shape(
        self,
    ) -> (
        tuple[str, str, int | None, float | None, int | None, int | None, tuple[LoraSpec, ...]]
        | None
    ):
        """What tasks must share to be drawn in one pipeline call; None: never batched.

        Edits are not batched: their references differ per task, and so may
        their pixel size (`size: auto` follows the first reference).
        """
        if self.image_urls:
            return None
        return (
            self.size,
            self.resolution,
            self.steps,
            self.guidance,
            self.width,
            self.height,
            self.loras,
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "prompt": self.prompt,
            "size": self.size,
            "resolution": self.resolution,
            "image_urls": list(self.image_urls),
            "seed": self.seed,
            "output_format": self.output_format,
            "steps": self.steps,
            "guidance": self.guidance,
        }
        # Written only when set, so a task of the unified API stores what it always did.
        if self.width is not None and self.height is not None:
            data["width"], data["height"] = self.width, self.height
        if self.bfl is not None:
            data["bfl"] = self.bfl.to_json()
        if self.loras:  # written only when asked for: older rows have none
            data["loras"] = [lora.to_json() for lora in self.loras]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskInput:
        bfl = data.get("bfl")
        return cls(
            **{
                **data,
                "image_urls": tuple(data.get("image_urls") or ()),
                "bfl": None if bfl is None else BflOptions(**bfl),
                "loras": tuple(LoraSpec(**lora) for lora in data.get("loras") or ()),
            }
        )


@dataclass(frozen=True)
class ResultFile:
    """One stored output file of a finished task."""

    key: str
    file_name: str
    content_type: str
    file_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "file_name": self.file_name,
            "content_type": self.content_type,
            "file_size": self.file_size,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultFile:
        return cls(**data)


@dataclass(frozen=True)
class NewTask:
    """A task about to be stored: what submit decided."""

    task_id: str
    owner: str  # the submitting key
    account_id: str | None  # the key's account
    model: str
    input: TaskInput
    callback_url: str | None
    created_at: float
    callback_events: tuple[str, ...] = TERMINAL_EVENTS
    price: int = 0  # credits held now, charged when it finishes

    def queued(self) -> Task:
        """The task as it is once stored: queued, no progress."""
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        return Task(status=TaskStatus.NOT_STARTED, progress=0, **given)


CANCELLED_MESSAGE = "Task was cancelled"


@dataclass(frozen=True)
class Task:
    """A task as stored."""

    task_id: str
    owner: str
    model: str
    input: TaskInput
    callback_url: str | None
    status: TaskStatus
    progress: int
    created_at: float
    engine: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    error_message: str | None = None
    files: tuple[ResultFile, ...] = field(default_factory=tuple)
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    callback_events: tuple[str, ...] = TERMINAL_EVENTS
    account_id: str | None = None
    price: int = 0
    cancelled_at: float | None = None  # when a cancel was asked for
    files_expired_at: float | None = None  # when retention removed its files
    upstream: dict[str, Any] | None = None  # its task at Black Forest Labs' API, once made

    @property
    def cancelled(self) -> bool:
        """Ended by a cancel: failed, with a cancel asked for."""
        return self.status is TaskStatus.FAILED and self.cancelled_at is not None

    @property
    def credits_amount(self) -> int:
        """What the task costs: its price, except that a failed task costs nothing."""
        return 0 if self.status is TaskStatus.FAILED else self.price

    def wants(self, event: str) -> bool:
        """Whether this task's callback_url is to be told about `event`."""
        return self.callback_url is not None and event in self.callback_events


@dataclass(frozen=True)
class Claim:
    """A running task held by one worker until `lease_expires_at`."""

    task: Task
    worker_id: str
    lease_token: str
