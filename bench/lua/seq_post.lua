-- POST distinct keys <prefix><offset+1>, <prefix><offset+2>, ... with a value of about
-- value_bytes bytes: every request writes a key never written before (RSS scenario).
-- wrk -t1 ... -s seq_post.lua -- <path> <key_prefix> <offset> <value_bytes>
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
local path, prefix, counter, pad, headers

function init(args)
  path = args[1] or "/api/performance/cache"
  prefix = args[2] or "rss-"
  counter = tonumber(args[3] or "0")
  pad = string.rep("x", tonumber(args[4] or "200"))
  headers = {["Content-Type"] = "application/json"}
end

function request()
  counter = counter + 1
  local body = '{"key":"' .. prefix .. counter .. '","value":"' .. pad .. '"}'
  return wrk.format("POST", path, headers, body)
end
