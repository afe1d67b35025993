// A real OpenID Connect provider for jitmesh's sign-in tests: panva's certified oidc-provider,
// configured here and nothing else. Usage: node provider.mjs CONFIG.json
// CONFIG: {"port": 0, "clients": [...], "accounts": {"alice": {"email": ..., "groups": [...]}},
//          "ttl": {"IdToken": 3600}}
// Prints one line "READY <issuer>" once it listens; stops on SIGTERM.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const server = http.createServer();
await new Promise((resolve) => server.listen(config.port || 0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: config.clients,
  // The dev login form (any password) stands for the company's sign-in page.
  features: { devInteractions: { enabled: true }, deviceFlow: { enabled: true } },
  // Put the profile claims (email, groups) in the ID token itself, as most IdPs do.
  conformIdTokenClaims: false,
  claims: { openid: ['sub'], email: ['email'], profile: ['preferred_username', 'groups'] },
  pkce: { required: () => true },
  ttl: { IdToken: 3600, AccessToken: 3600, ...(config.ttl || {}) },
  jwks: config.jwks,
  async findAccount(ctx, id) {
    // Read at each sign-in: a test changes a user's groups at the provider between sign-ins.
    const account = JSON.parse(readFileSync(process.argv[2], 'utf8')).accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, ...account };
      },
    };
  },
});
provider.proxy = false;
server.on('request', provider.callback());
process.on('SIGTERM', () => server.close(() => process.exit(0)));
console.log(`READY ${issuer}`);
