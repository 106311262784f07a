"""The embedded broker: kombu's filesystem transport, made safe for several consumers and a crash.

kombu's own ``filesystem://`` transport writes a message in place, under its final ``.msg``
name, so a consumer listing the folder can take and read a file before it is written (a
``JSONDecodeError`` that killed the embedded worker about once in 830 jobs); and it moves a
taken message to the system's temporary folder, which is a copy and a delete where that is
another file system, so two consumers (the embedded mode runs two workers) could both read it.

This transport changes those steps, and the creation of an exchange's bindings file:

- a message is written under a name no consumer matches (a dot in front, ``.part`` after),
  then renamed to its final name: a rename is atomic, so a consumer sees whole messages only;
- a consumer takes a message by renaming it into ``taken/`` next to the queue folder (the same
  file system: atomic), so exactly one consumer gets it, then reads and deletes it;
- a new exchange file is written aside and linked into place, and a binding this process has
  declared but not yet written counts (kombu records it in memory first: a thread publishing in
  between routed its message nowhere).

Why not kombu's SQLAlchemy transport over SQLite: SQLAlchemy is not a dependency, and the
folder keeps the embedded mode to the standard library.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

SCHEME = "classlens-fs"


class Channel(filesystem.Channel):
    """Atomic writes and single-consumer takes (see the module)."""

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        folder = Path(self.data_folder_out)
        partial = folder / f".{name}.part"
        try:
            partial.write_bytes(str_to_bytes(dumps(payload)))
            os.replace(partial, folder / name)
        except OSError as error:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise filesystem.ChannelError(f"cannot add {name!r} to {folder}") from error

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        wanted = f"{queue}.msg"
        inbox = Path(self.data_folder_in)
        taken = inbox.parent / "taken"
        taken.mkdir(exist_ok=True)
        for name in sorted(os.listdir(inbox)):
            if name.startswith(".") or name.partition(".")[2] != wanted:
                continue
            mine = taken / name
            try:
                os.rename(inbox / name, mine)  # one consumer wins; the others find it gone
            except OSError:
                continue
            try:
                payload = mine.read_bytes()
            except OSError as error:
                raise filesystem.ChannelError(f"cannot read {mine}") from error
            finally:
                with contextlib.suppress(OSError):
                    mine.unlink()
            return loads(bytes_to_str(payload))
        raise Empty()

    def _queue_bind(self, exchange: Any, routing_key: Any, pattern: Any, queue: Any) -> None:
        """A new exchange file appears whole (written aside, then linked into place); an existing one as kombu does."""
        file = self._exchange_file(exchange)
        if not file.exists():
            self.control_folder.mkdir(exist_ok=True)
            binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
            partial = file.with_name(f".{file.name}.{uuid.uuid4().hex}.part")
            partial.write_bytes(str_to_bytes(dumps([binding])))
            try:
                os.link(partial, file)  # fails if another process made it meanwhile: then add to theirs
                return
            except FileExistsError:
                pass
            finally:
                partial.unlink()
        super()._queue_bind(exchange, routing_key, pattern, queue)

    def get_table(self, exchange: Any) -> Any:
        """The exchange's bindings; this process's own when its file is not there yet.

        kombu records a binding in the process's state before it writes the file, so another thread
        that sees the binding skips declaring it and may publish before the file exists: without
        this, such a message was routed nowhere and dropped.
        """
        table = super().get_table(exchange)
        if table:
            return table
        known = self.state.exchanges.get(exchange, {}).get("table", [])
        return [filesystem.exchange_queue_t(*binding) for binding in known]


class Transport(filesystem.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
