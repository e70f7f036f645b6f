// Drives prism with the `graphql-ws` client library (graphql-transport-ws):
// `node subscribe.mjs http://127.0.0.1:PORT TOKEN`. Subscribes to
// messageAdded, sends a message with a mutation over HTTP, and prints the
// message the subscription delivered as JSON. Exits 1 on any failure or after
// 10 s.
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

const [base, token] = process.argv.slice(2);
const timer = setTimeout(() => { console.error('timed out'); process.exit(1); }, 10_000);

const client = createClient({
  url: base.replace(/^http/, 'ws') + '/graphql',
  webSocketImpl: WebSocket,
  connectionParams: { Authorization: `Bearer ${token}` },
  lazy: false,
});

const received = new Promise((resolve, reject) => {
  const unsubscribe = client.subscribe(
    { query: 'subscription { messageAdded(userId: 1) { id content userId } }' },
    {
      next: (msg) => { unsubscribe(); resolve(msg); },
      error: reject,
      complete: () => {},
    },
  );
});

// The subscription is live once the server acknowledged the connection; a
// mutation over the same client is ordered after the subscribe message.
await new Promise((resolve) => client.on('connected', resolve));
await new Promise((resolve, reject) => {
  client.subscribe(
    { query: 'mutation { sendMessage(content: "from graphql-ws", userId: 1) { id } }' },
    { next: () => {}, error: reject, complete: resolve },
  );
});
const msg = await received;
console.log(JSON.stringify(msg));
clearTimeout(timer);
await client.dispose();
process.exit(msg.data?.messageAdded?.content === 'from graphql-ws' ? 0 : 1);
