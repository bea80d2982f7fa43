-- GET <prefix><i> for i drawn uniformly from 1..nkeys (requests pre-built in init).
-- wrk ... -s get.lua -- <path_prefix> <nkeys>
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
local reqs, n = {}, 0

function init(args)
  local prefix = args[1] or "/api/performance/cache/k"
  n = tonumber(args[2] or "10000")
  for i = 1, n do
    reqs[i] = wrk.format("GET", prefix .. i)
  end
  math.randomseed(20240501)
end

function request()
  return reqs[math.random(n)]
end
