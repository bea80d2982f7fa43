"""A TCP proxy between one service instance and Redis, to cut and heal only that link."""

from __future__ import annotations

import asyncio
import contextlib
import functools

from tests.procs import free_port


class LinkProxy:
    """Forwards 127.0.0.1:port to a Redis; `cut()` drops every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        # Bumped by each cut: a connection accepted before it but handled after it is dropped.
        self._generation = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> LinkProxy:
        accept = functools.partial(self._accept, self._generation)
        self._server = await asyncio.start_server(accept, "127.0.0.1", self.port)
        return self

    async def cut(self) -> None:
        """Like a network partition that resets: open connections die, new ones are refused."""
        self._generation += 1
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def heal(self) -> None:
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()

    async def _accept(
        self, generation: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        # The server runs this in a task of its own, which may start after a cut.
        if generation != self._generation:
            client_w.transport.abort()
            return
        self._writers.add(client_w)  # a cut while Redis is being dialled aborts it too
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        if client_w.transport.is_closing() or generation != self._generation:
            client_w.transport.abort()
            redis_w.transport.abort()
            return
        self._writers.add(redis_w)
        for source, sink in ((client_r, redis_w), (redis_r, client_w)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(sink)
            with contextlib.suppress(Exception):
                sink.transport.abort()
