// Two matrix-js-sdk clients (npm `matrix-js-sdk`, the library under Element Web) chat on a
// Palpo at the URL given: both start their sync loop as Element Web does (push rules,
// capabilities, filters, long-polling /sync), then create a room with an invite, join, send,
// see the message arrive live, send a read receipt and typing, redact, and back-paginate.
// Every request the SDK makes is recorded; any answer of 500 or more, or any step that fails,
// fails the run.
//
//     node js_sdk_smoke.mjs http://127.0.0.1:8008
//
// Exits 1 when a step fails.

// matrix-js-sdk uses Promise.withResolvers (Node 22); Debian's Node 20 lacks it.
if (!Promise.withResolvers) {
  Promise.withResolvers = function () {
    let resolve, reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { promise, resolve, reject };
  };
}
const sdk = await import("matrix-js-sdk");

const url = process.argv[2];
const tag = Date.now() % 1e8;
const failures = [];
const requests = [];

const realFetch = globalThis.fetch;
globalThis.fetch = async (input, init) => {
  const response = await realFetch(input, init);
  const path = String(input).replace(url, "").split("?")[0];
  requests.push({ method: init?.method ?? "GET", path, status: response.status });
  return response;
};

function expect(step, condition, detail = "") {
  console.log(condition ? "ok  " : "FAIL", step, condition ? "" : detail);
  if (!condition) failures.push(step);
}

/// Whether `predicate` holds within `ms` (checked every 20 ms): the SDK's events can fire
/// before the state they announce is where a getter finds it.
async function until(ms, predicate) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (predicate()) return true;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return predicate();
}

function within(ms, promise) {
  return Promise.race([promise, new Promise((resolve) => setTimeout(() => resolve(undefined), ms))]);
}

async function register(name) {
  const anonymous = sdk.createClient({ baseUrl: url });
  const account = await anonymous.registerRequest({
    username: name,
    password: "password123",
    auth: { type: "m.login.dummy" },
  });
  return sdk.createClient({
    baseUrl: url,
    accessToken: account.access_token,
    userId: account.user_id,
    deviceId: account.device_id,
  });
}

function synced(client) {
  return new Promise((resolve) => {
    if (["PREPARED", "SYNCING"].includes(client.getSyncState())) return resolve(true);
    client.on("sync", (state) => {
      if (state === "PREPARED" || state === "SYNCING") resolve(true);
    });
  });
}

let alice, bob;
try {
  alice = await register(`jsalice${tag}`);
  bob = await register(`jsbob${tag}`);
  await alice.startClient({ initialSyncLimit: 10 });
  await bob.startClient({ initialSyncLimit: 10 });
  const started = await within(15000, Promise.all([synced(alice), synced(bob)]));
  expect("sync loops start", started !== undefined, `${alice.getSyncState()} ${bob.getSyncState()}`);

  const { room_id: roomId } = await alice.createRoom({ name: "js room", invite: [bob.getUserId()] });
  const invited = await until(5000, () => bob.getRoom(roomId)?.getMyMembership() === "invite");
  expect("invite arrives", invited);
  await bob.joinRoom(roomId);

  const arrived = within(
    5000,
    new Promise((resolve) => {
      bob.on("Room.timeline", (event, room) => {
        if (room?.roomId === roomId && event.getContent().body === "hi from js") resolve(true);
      });
    }),
  );
  const sent = await alice.sendTextMessage(roomId, "hi from js");
  expect("message arrives live", (await arrived) === true);

  const room = bob.getRoom(roomId);
  await bob.sendReadReceipt(room.findEventById(sent.event_id));
  await bob.sendTyping(roomId, true, 3000);
  expect("room name", room.name === "js room", room.name);
  expect("members", room.getJoinedMemberCount() === 2, room.getJoinedMemberCount());

  await alice.redactEvent(roomId, sent.event_id);
  const redacted = await until(5000, () => room.findEventById(sent.event_id)?.isRedacted());
  expect("redaction applied", redacted);

  await bob.scrollback(room, 30);
  const types = room.getLiveTimeline().getEvents().map((e) => e.getType());
  expect("back-paginated to the creation", types.includes("m.room.create"), types.join(","));
} catch (error) {
  console.log("FAIL", error);
  failures.push(String(error));
} finally {
  alice?.stopClient();
  bob?.stopClient();
}

const unexpected = requests.filter((r) => r.status >= 500);
expect("no server errors", unexpected.length === 0, JSON.stringify(unexpected));
const refused = [...new Set(requests.filter((r) => r.status >= 400).map((r) => `${r.method} ${r.path} ${r.status}`))];
console.log("answered 4xx (endpoints not implemented, or refused):", refused);
console.log("failures:", failures);
process.exit(failures.length ? 1 : 0);
