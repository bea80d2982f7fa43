-- Shared by every script here (loaded with dofile): prints one machine-readable line that
-- bench/run.py parses, with exact counts and latencies in microseconds.
function done(summary, latency, requests)
  local e = summary.errors
  local pct = {}
  for _, q in ipairs({50, 75, 90, 99, 99.9}) do
    pct[#pct + 1] = string.format('"p%s":%d', tostring(q), latency:percentile(q))
  end
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f,%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(pct, ",")))
end
