// An example Harbor strategy in JavaScript: the healthy backend with the fewest requests in
// flight, ties broken in turn by the pick's sequence number. Built into a WebAssembly component
// with componentize-js (`npm run build`); the contract is ../../wit/strategy/strategy.wit.
//
// How the contract's types look from JavaScript: records are objects with camelCase fields,
// u64 values (sequence, entropy, hash key, latency) are BigInts, an option is a value or
// `undefined`, and a `result` error is thrown.

import { inFlight } from 'harbor:strategy/load@0.5.0';

const NAME = 'example-js';

// The backends of each route, by the host's route number.
const routes = new Map();

function choose(route, sequence, exclude) {
  const backends = routes.get(route) || [];
  const usable = backends
    .map((b, i) => ({ i, healthy: b.healthy }))
    .filter((b) => !exclude.includes(b.i));
  // Healthy backends when there are any, as the contract asks; otherwise any left.
  const candidates = usable.some((b) => b.healthy) ? usable.filter((b) => b.healthy) : usable;
  if (candidates.length === 0) return undefined;
  const start = Number(sequence % BigInt(candidates.length));
  let best;
  for (let k = 0; k < candidates.length; k++) {
    const c = candidates[(start + k) % candidates.length];
    const load = inFlight(c.i);
    if (best === undefined || load < best.load) best = { i: c.i, load };
  }
  return best.i;
}

// This strategy has no settings: `{}` is all it accepts, plugin-wide or for a route. A thrown
// string is the reason the host shows whoever wrote the settings.
function noSettings(text) {
  const settings = JSON.parse(text.trim() === '' ? '{}' : text);
  const keys = Object.keys(settings);
  if (keys.length > 0) {
    throw `${NAME} has no settings; give {}, not ${keys[0]}`;
  }
}

export const strategy = {
  describe() {
    return { name: NAME, version: '0.1.0', wantsOutcomes: false, usesHashKey: false };
  },
  configure(config) {
    noSettings(config);
  },
  configureRoute(_route, settings) {
    noSettings(settings);
  },
  rebuild(route, backends) {
    routes.set(route, backends);
    // No plan: the host calls `pick` for every request.
    return undefined;
  },
  forget(route) {
    routes.delete(route);
  },
  pick(route, sequence, _entropy, _hashKey) {
    return choose(route, sequence, []);
  },
  retry(route, sequence, _entropy, _hashKey, exclude) {
    return choose(route, sequence, Array.from(exclude));
  },
  done(_route, _index, _outcome, _latencyNs) {},
};
