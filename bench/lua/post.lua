-- POST {"key":"k<i>","value":{...}} for i drawn uniformly from 1..nkeys (pre-built).
-- The value is the same JSON the GET scenarios read, so the key space stays the same.
-- wrk ... -s post.lua -- <path> <nkeys>
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
local reqs, n = {}, 0

function init(args)
  local path = args[1] or "/api/performance/cache"
  n = tonumber(args[2] or "10000")
  local headers = {["Content-Type"] = "application/json"}
  for i = 1, n do
    local body = string.format(
      '{"key":"k%d","value":{"id":%d,"name":"item-%d","tags":["bench","cache"],"score":0.5}}',
      i, i, i)
    reqs[i] = wrk.format("POST", path, headers, body)
  end
  math.randomseed(20240502)
end

function request()
  return reqs[math.random(n)]
end
