// Count the results of the HTTP caching test suite the way its published tables do: each
// test's outcome comes from the suite's own determineTestResult(), so a test whose setup or
// dependency failed is not counted as passed.
// usage: node cache_tests_summary.mjs <suite dir> <results.json> [--list]
import fs from 'fs'
import path from 'path'
import { pathToFileURL } from 'url'

const [suiteDir, resultsFile, ...flags] = process.argv.slice(2)
const suite = path.resolve(suiteDir)
const results = JSON.parse(fs.readFileSync(path.resolve(resultsFile), 'utf8'))
const load = p => import(pathToFileURL(path.join(suite, p)).href)

const tests = (await load('tests/index.mjs')).default
if (fs.existsSync(path.join(suite, 'tests/surrogate-control.mjs'))) {
  tests.push((await load('tests/surrogate-control.mjs')).default) // as the suite's cli.mjs does
}
process.chdir(suite) // display.mjs resolves its templates from the working directory
const { determineTestResult } = await load('lib/display.mjs')

const OUTCOME = { '✅': 'pass', '⛔️': 'fail', '⚠️': 'optional_fail', Y: 'yes', N: 'no', '-': 'untested', '🔹': 'setup_fail', '⁉️': 'harness_fail', '⚪️': 'dependency_fail', '↻': 'retry' }
const counts = {}
const notPassed = []
for (const group of tests) {
  for (const test of group.tests) {
    if (test.browser_only === true) continue
    const kind = test.kind || 'required'
    const outcome = OUTCOME[determineTestResult(tests, test.id, results)[2]] || 'unknown'
    counts[kind] = counts[kind] || {}
    counts[kind][outcome] = (counts[kind][outcome] || 0) + 1
    if (!['pass', 'yes', 'no'].includes(outcome)) {
      const raw = results[test.id]
      notPassed.push(`${outcome.padEnd(16)}${kind.padEnd(9)}${test.id}  ${Array.isArray(raw) ? raw.join(': ') : (raw ?? '')}`)
    }
  }
}
const total = o => Object.values(o || {}).reduce((a, b) => a + b, 0)
const req = counts.required || {}
const opt = counts.optimal || {}
console.log(`required: ${req.pass || 0} of ${total(req)} passed`)
console.log(`optimal:  ${opt.pass || 0} of ${total(opt)} passed`)
console.log(`check:    ${(counts.check || {}).yes || 0} yes, ${(counts.check || {}).no || 0} no`)
const passed = (req.pass || 0) + (opt.pass || 0)
console.log(`cache-tests: ${passed} passed, ${total(req) + total(opt) - passed} failed`)
if (flags.includes('--list')) notPassed.forEach(line => console.log(line))
