-- wrk script of tools/membench.py: checks every answer of the app (status 200, and a
-- sum of K elements equal to K times the version it reports) and reports, as one JSON
-- line after the run, how many answers each version had and when the requests that got
-- them started (the app stamps each with time.monotonic() at its start).
local K = 8
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   ok, bad, non200 = 0, 0, 0
   v1, v2, vother = 0, 0, 0
   max_t_v1, min_t_v2 = -1, -1
end

function response(status, headers, body)
   if status ~= 200 then
      non200 = non200 + 1
      return
   end
   local v = tonumber(body:match('"v": *(%d+)'))
   local t = tonumber(body:match('"t": *([%d%.eE+-]+)'))
   local s = tonumber(body:match('"s": *([%d%.eE+-]+)'))
   if v == nil or t == nil or s == nil or s ~= K * v then
      bad = bad + 1
      return
   end
   ok = ok + 1
   if v == 1 then
      v1 = v1 + 1
      if t > max_t_v1 then max_t_v1 = t end
   elseif v == 2 then
      v2 = v2 + 1
      if min_t_v2 < 0 or t < min_t_v2 then min_t_v2 = t end
   else
      vother = vother + 1
   end
end

function done(summary, latency, requests)
   local agg = {ok = 0, bad = 0, non200 = 0, v1 = 0, v2 = 0, vother = 0,
                max_t_v1 = -1, min_t_v2 = -1}
   for _, th in ipairs(threads) do
      for _, key in ipairs({"ok", "bad", "non200", "v1", "v2", "vother"}) do
         agg[key] = agg[key] + th:get(key)
      end
      local a, b = th:get("max_t_v1"), th:get("min_t_v2")
      if a > agg.max_t_v1 then agg.max_t_v1 = a end
      if b >= 0 and (agg.min_t_v2 < 0 or b < agg.min_t_v2) then agg.min_t_v2 = b end
   end
   local e = summary.errors
   io.write(string.format(
      'MEMBENCH {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
      '"write": %d, "status": %d, "timeout": %d, "ok": %d, "bad": %d, "non200": %d, ' ..
      '"v1": %d, "v2": %d, "vother": %d, "max_t_v1": %.6f, "min_t_v2": %.6f, ' ..
      '"p50_us": %d, "p99_us": %d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      agg.ok, agg.bad, agg.non200, agg.v1, agg.v2, agg.vother, agg.max_t_v1, agg.min_t_v2,
      latency:percentile(50), latency:percentile(99)))
end
