-- The whole workflow: its meta hash and every step, in the order they were added.
local names = redis.call('LRANGE', P .. 'steps', 0, -1)
local steps = {}
for i = 1, #names do steps[i] = snap(names[i]) end
return {'ok', redis.call('HGETALL', meta), steps}
