// A real OpenID Connect provider (panva/oidc-provider) on 127.0.0.1 for Tessera's identity tests.
//
//   node provider.mjs PORT
//
// Prints one JSON line {"issuer": ...} once it listens. Clients:
//   tessera-cli    public native client: authorization code + PKCE (any loopback port), refresh
//                  tokens, device flow
//   gateway        client_credentials, a workload token for resource urn:tessera-workers
//                  (audience exactly "tessera-workers", tenant in kubernetes.io.namespace)
//   short-lived    like gateway, but its tokens live 2 seconds
//   other-service  client_credentials for urn:other-service (a token for the wrong audience)
//   tessera-ui     public native client of the admin UI: authorization code + PKCE, redirect
//                  http://127.0.0.1:<any port>/ui/login/callback
// Access tokens for resource urn:tessera (the default) are JWTs with audience "tessera", the
// granted scopes in `scope` and the tenant in `tenant` (the part of the login after "@").
// Logins are completed without HTML: GET /interaction/:uid answers JSON, POST
// /interaction/:uid/login takes `login=alice@acme`, POST /interaction/:uid/confirm grants
// every scope asked for. A browser (Accept: text/html) gets the same two steps as HTML forms.
import http from 'node:http';
import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const issuer = `http://127.0.0.1:${port}`;
const ALL_SCOPES = 'admin read generate adapter-manager';

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-key-1', alg: 'RS256', use: 'sig' };

const resources = {
  'urn:tessera': { audience: 'tessera', scope: ALL_SCOPES },
  'urn:tessera-workers': { audience: 'tessera-workers', scope: ALL_SCOPES },
  'urn:other-service': { audience: 'other-service', scope: ALL_SCOPES },
};

const config = {
  clients: [
    {
      client_id: 'tessera-cli', application_type: 'native', token_endpoint_auth_method: 'none',
      redirect_uris: ['http://127.0.0.1/callback'], response_types: ['code'],
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    },
    {
      client_id: 'tessera-ui', application_type: 'native', token_endpoint_auth_method: 'none',
      redirect_uris: ['http://127.0.0.1/ui/login/callback'], response_types: ['code'],
      grant_types: ['authorization_code', 'refresh_token'],
    },
    { client_id: 'gateway', client_secret: 'gateway-secret', grant_types: ['client_credentials'],
      response_types: [], redirect_uris: [] },
    { client_id: 'short-lived', client_secret: 'short-secret', grant_types: ['client_credentials'],
      response_types: [], redirect_uris: [] },
    { client_id: 'other-service', client_secret: 'other-secret', grant_types: ['client_credentials'],
      response_types: [], redirect_uris: [] },
  ],
  jwks: { keys: [signingKey] },
  cookies: { keys: ['tessera-test-cookie-key'] },
  scopes: ['openid', 'offline_access'],
  findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    deviceFlow: {
      enabled: true,
      userCodeConfirmSource: async (ctx, form) => { ctx.body = `<html><body>${form}</body></html>`; },
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (ctx, client, oneOf) => oneOf || 'urn:tessera',
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, indicator, client) => {
        const info = resources[indicator];
        if (!info) throw new Error(`unknown resource ${indicator}`);
        return {
          ...info, accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  extraTokenClaims: async (ctx, token) => {
    if (token.accountId) return { tenant: token.accountId.split('@')[1] || 'default' };
    if (token.clientId === 'tessera-cli') return undefined;
    return { tenant: 'acme', 'kubernetes.io': { namespace: 'acme', serviceaccount: { name: token.clientId } } };
  },
  ttl: { AccessToken: 600, ClientCredentials: (ctx, token, client) => (client.clientId === 'short-lived' ? 2 : 600), RefreshToken: 3600, DeviceCode: 120, Interaction: 600,
         Session: 3600, Grant: 3600 },
};

const provider = new Provider(issuer, config);
provider.on('server_error', (ctx, err) => console.error('server_error', err));
const callback = provider.callback();

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString());
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  if (!action && (req.headers.accept || '').includes('text/html')) {
    // A browser (the admin UI's tests): the same two steps as forms.
    const login = details.prompt.name === 'login';
    res.setHeader('content-type', 'text/html; charset=utf-8');
    res.end(`<!doctype html><html><head><title>Test provider</title></head><body>
      <form method="post" action="/interaction/${uid}/${login ? 'login' : 'confirm'}">
        ${login ? '<label>login <input name="login" id="login"></label>' : '<p id="consent">Grant access?</p>'}
        <button type="submit" id="submit">${login ? 'Log in' : 'Allow'}</button>
      </form></body></html>`);
    return;
  }
  if (!action) {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ uid, prompt: details.prompt.name, params: details.params }));
    return;
  }
  if (action === 'login') {
    const form = await readForm(req);
    await provider.interactionFinished(req, res, { login: { accountId: form.get('login') } },
      { mergeWithLastSubmission: false });
    return;
  }
  // confirm: grant every scope and resource scope asked for
  const { prompt: { details: missing }, params, session: { accountId } } = details;
  let grant = details.grantId ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes || {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

const server = http.createServer(async (req, res) => {
  const match = new URL(req.url, issuer).pathname.match(/^\/interaction\/([^/]+)(?:\/(login|confirm))?$/);
  if (!match) return callback(req, res);
  try {
    await interaction(req, res, match[1], match[2]);
  } catch (err) {
    console.error('interaction error', err);
    res.statusCode = 400;
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ error: String(err) }));
  }
});
server.listen(port, '127.0.0.1', () => console.log(JSON.stringify({ issuer })));
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
