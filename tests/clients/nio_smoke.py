"""A chat between two matrix-nio clients (PyPI `matrix-nio`, no end-to-end encryption) on a
Palpo at the URL given: registration, login, profile, room creation with an alias and an
invite, joining, sending, incremental sync, typing, read markers, /messages, state, /context,
devices, redaction, kick, forget, leave. Every call must give nio's success response type, and
nio must read every event it is sent (it logs events it cannot validate).

    python nio_smoke.py http://127.0.0.1:8008

Exits 1 when a step fails.
"""

import asyncio
import logging
import sys
import time

from nio import (
    AsyncClient,
    DevicesResponse,
    JoinedRoomsResponse,
    JoinResponse,
    LoginResponse,
    ProfileGetResponse,
    ProfileSetDisplayNameResponse,
    RegisterResponse,
    RoomContextResponse,
    RoomCreateResponse,
    RoomForgetResponse,
    RoomGetEventResponse,
    RoomGetStateEventResponse,
    RoomGetStateResponse,
    RoomKickResponse,
    RoomLeaveResponse,
    RoomMessagesResponse,
    RoomReadMarkersResponse,
    RoomRedactResponse,
    RoomResolveAliasResponse,
    RoomSendResponse,
    RoomTypingResponse,
    SyncResponse,
)

FAILURES = []


class FailOnInvalidEvent(logging.Handler):
    """nio logs, and drops, events that do not match its schemas."""

    def emit(self, record):
        message = record.getMessage()
        if "Error validating event" in message:
            FAILURES.append("nio could not read an event: " + message.splitlines()[0])


def check(step, response, expected):
    ok = isinstance(response, expected)
    print(("ok  " if ok else "FAIL"), step, "" if ok else repr(response)[:400])
    if not ok:
        FAILURES.append(step)
    return ok


def expect(step, condition, detail=""):
    print(("ok  " if condition else "FAIL"), step, "" if condition else detail)
    if not condition:
        FAILURES.append(step)


async def chat(url):
    tag = int(time.time() * 1000) % 10**8
    alice = AsyncClient(url, f"alice{tag}")
    bob = AsyncClient(url, f"bob{tag}")
    try:
        check("register alice", await alice.register(f"alice{tag}", "password123", "A"), RegisterResponse)
        check("register bob", await bob.register(f"bob{tag}", "password123", "B"), RegisterResponse)
        second = AsyncClient(url, alice.user_id)
        check("log in again", await second.login("password123", device_name="second"), LoginResponse)
        await second.close()

        check("set display name", await alice.set_displayname("Alice"), ProfileSetDisplayNameResponse)
        profile = await bob.get_profile(alice.user_id)
        if check("get profile", profile, ProfileGetResponse):
            expect("display name", profile.displayname == "Alice", profile.displayname)
        check("initial sync", await alice.sync(timeout=0, full_state=True), SyncResponse)

        created = await alice.room_create(
            name="Smoke", topic="testing", alias=f"smoke{tag}", invite=[bob.user_id]
        )
        if not check("create room", created, RoomCreateResponse):
            return
        room_id = created.room_id
        check("resolve alias", await bob.room_resolve_alias(f"#smoke{tag}:localhost"), RoomResolveAliasResponse)
        synced = await bob.sync(timeout=0)
        if check("invitee's sync", synced, SyncResponse):
            expect("invite in sync", room_id in synced.rooms.invite)
        check("join", await bob.join(room_id), JoinResponse)
        check("inviter's sync", await alice.sync(timeout=0), SyncResponse)
        check("joiner's sync", await bob.sync(timeout=0), SyncResponse)

        sent = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hello"})
        check("send", sent, RoomSendResponse)
        synced = await bob.sync(timeout=5000, since=bob.next_batch)
        if check("incremental sync", synced, SyncResponse):
            joined = synced.rooms.join.get(room_id)
            bodies = [getattr(e, "body", None) for e in joined.timeline.events] if joined else []
            expect("message delivered", "hello" in bodies, bodies)
            room = bob.rooms.get(room_id)
            expect("room name", room is not None and room.display_name == "Smoke")
            expect("member count", room is not None and room.member_count == 2)

        check("typing", await bob.room_typing(room_id, True, 5000), RoomTypingResponse)
        check("read markers", await bob.room_read_markers(room_id, sent.event_id, sent.event_id), RoomReadMarkersResponse)
        check("sync with ephemeral", await alice.sync(timeout=0, since=alice.next_batch), SyncResponse)
        history = await bob.room_messages(room_id, start="", limit=20)
        if check("messages", history, RoomMessagesResponse):
            expect("history holds the message", any(getattr(e, "body", None) == "hello" for e in history.chunk))
        check("state", await bob.room_get_state(room_id), RoomGetStateResponse)
        check("state event", await bob.room_get_state_event(room_id, "m.room.name"), RoomGetStateEventResponse)
        check("event", await bob.room_get_event(room_id, sent.event_id), RoomGetEventResponse)
        check("context", await bob.room_context(room_id, sent.event_id, limit=5), RoomContextResponse)
        check("joined rooms", await bob.joined_rooms(), JoinedRoomsResponse)
        check("devices", await alice.devices(), DevicesResponse)

        check("redact", await alice.room_redact(room_id, sent.event_id, reason="oops"), RoomRedactResponse)
        synced = await bob.sync(timeout=5000, since=bob.next_batch)
        if check("sync after redaction", synced, SyncResponse):
            joined = synced.rooms.join.get(room_id)
            kinds = [type(e).__name__ for e in joined.timeline.events] if joined else []
            expect("redaction delivered", "RedactionEvent" in kinds, kinds)
        check("kick", await alice.room_kick(room_id, bob.user_id, "bye"), RoomKickResponse)
        check("sync after kick", await bob.sync(timeout=0, since=bob.next_batch), SyncResponse)
        check("forget", await bob.room_forget(room_id), RoomForgetResponse)
        check("leave", await alice.room_leave(room_id), RoomLeaveResponse)
    finally:
        await alice.close()
        await bob.close()


def main():
    logging.getLogger("nio").addHandler(FailOnInvalidEvent())
    asyncio.run(chat(sys.argv[1]))
    print("failures:", FAILURES)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
