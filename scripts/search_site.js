// The site's search as a reader gets it: Material's own search worker, run in node on a built site's index,
// prints the first pages found for a query, best first.
//
//   mkdocs build --strict --site-dir /tmp/site
//   node scripts/search_site.js /tmp/site "alpha schedule"
const fs = require("fs"), vm = require("vm"), path = require("path");
const [site, query] = process.argv.slice(2);
const dir = path.join(site, "assets/javascripts/workers");
const worker = fs.readdirSync(dir).find((f) => /^search\..*\.min\.js$/.test(f));
const index = JSON.parse(fs.readFileSync(path.join(site, "search/search_index.json"), "utf8"));
const context = { console, setTimeout, clearTimeout };
context.self = context;
context.postMessage = (message) => {
  if (message.type === 3) {
    const items = message.data.items;
    console.log(`${items.length} results for "${query}"`);
    items.slice(0, 8).forEach((group, i) => console.log(`${i + 1}. ${group[0].location} (score ${group[0].score.toFixed(2)})`));
  } else if (message.type === 1) {
    context.onmessage({ data: { type: 2, data: query } });
  }
};
context.addEventListener = (name, fn) => { context.onmessage = fn; };
vm.createContext(context);
vm.runInContext(fs.readFileSync(path.join(dir, worker), "utf8"), context);
context.onmessage({ data: { type: 0, data: { ...index, options: { suggest: false } } } });
