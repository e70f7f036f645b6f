// Runs the GraphQL-over-HTTP audit suite of the `graphql-http` package against
// a server: `node audit.mjs http://127.0.0.1:PORT/graphql`. Prints every
// audit; exits 1 if any MUST or SHOULD audit does not pass cleanly.
import { auditServer } from 'graphql-http';

const url = process.argv[2];
const results = await auditServer({ url });
let failed = 0;
for (const r of results) {
  const required = r.name.startsWith('MUST') || r.name.startsWith('SHOULD');
  const line = `${r.status.padEnd(5)} ${r.id} ${r.name}`;
  if (r.status === 'ok') {
    console.log(line);
  } else {
    console.log(`${line}\n      ${r.reason}`);
    if (required) failed++;
  }
}
const must = results.filter((r) => r.name.startsWith('MUST') || r.name.startsWith('SHOULD'));
console.log(`\n${must.length - failed} of ${must.length} MUST/SHOULD audits passed (${results.length} audits in all)`);
process.exit(failed === 0 ? 0 : 1);
