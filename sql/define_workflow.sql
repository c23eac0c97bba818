-- orch.define_workflow: validation and versioning.

-- Shows the version, or the SQLSTATE, message, detail and hint of a rejected definition.
CREATE FUNCTION pg_temp.try_define(name text, def jsonb) RETURNS text LANGUAGE sql AS $$
	SELECT app.show_error(format('SELECT ''version '' || orch.define_workflow(%L, %L)', name, def))
$$;

-- A valid definition: a branch on the classification, and a fan-in.
SELECT orch.define_workflow('ticket', '{
  "description": "triage a support ticket",
  "steps": [
    {"name": "classify", "kind": "sql", "function": "app.classify"},
    {"name": "refund",   "kind": "sql", "function": "app.record", "needs": ["classify"],
     "when": "$.steps.classify.kind == \"refund\"",
     "retry": {"max_attempts": 5, "initial_interval": "1s", "backoff_coefficient": 2,
               "max_interval": "1m", "jitter": "full", "non_retryable": ["permanent", "23505"]},
     "timeout": "30s"},
    {"name": "answer",   "kind": "sql", "function": "app.record", "needs": ["classify"],
     "when": "$.steps.classify.kind != \"refund\""},
    {"name": "cool_off", "kind": "sleep", "duration": "10ms", "needs": ["refund", "answer"]},
    {"name": "close",    "kind": "sql", "function": "app.record", "needs": ["cool_off"]}
  ]}');

-- The compiled steps: dependents are derived from needs; retry defaults follow Temporal.
SELECT name, kind, needs, dependents, guard, function, sleep_for, max_attempts,
	   initial_interval, backoff_coefficient, max_interval, jitter, non_retryable, timeout
  FROM orch.workflow_steps WHERE workflow = 'ticket' ORDER BY ordinal;

-- The same definition again keeps its version; a changed one makes a new version.
SELECT pg_temp.try_define('ticket', definition) FROM orch.workflows WHERE name = 'ticket';
SELECT pg_temp.try_define('ticket', jsonb_set(definition, '{description}', '"v2"'))
  FROM orch.workflows WHERE name = 'ticket' AND version = 1;
SELECT name, version, definition->>'description' AS description FROM orch.workflows ORDER BY version;

-- Invalid definitions: each names the JSON path, with its SQLSTATE.

-- 1. not an object
SELECT pg_temp.try_define('bad', '[1, 2]');
-- 2. no steps
SELECT pg_temp.try_define('bad', '{"description": "nothing to do"}');
-- 3. empty steps
SELECT pg_temp.try_define('bad', '{"steps": []}');
-- 4. unknown top-level key
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record"}], "stesp": 1}');
-- 5. unknown step key (a typo of a retry key's parent)
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "retries": 3}]}');
-- 6. unknown key in a retry policy
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "retry": {"max_attempt": 3}}]}');
-- 7. missing name
SELECT pg_temp.try_define('bad', '{"steps": [{"kind": "sql", "function": "app.record"}]}');
-- 8. duplicate step name
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record"}, {"name": "a", "kind": "sleep", "duration": "1s"}]}');
-- 9. unknown step in needs
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "needs": ["b"]}]}');
-- 10. a step that needs itself
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "needs": ["a"]}]}');
-- 11. a cycle through three steps
SELECT pg_temp.try_define('bad', '{"steps": [
  {"name": "start", "kind": "sql", "function": "app.record"},
  {"name": "a", "kind": "sql", "function": "app.record", "needs": ["start", "c"]},
  {"name": "b", "kind": "sql", "function": "app.record", "needs": ["a"]},
  {"name": "c", "kind": "sql", "function": "app.record", "needs": ["b"]}]}');
-- 12. a bad duration
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "nap", "kind": "sleep", "duration": "five minutes"}]}');
-- 13. a duration that is not a string
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "nap", "kind": "sleep", "duration": 300}]}');
-- 14. a negative retry interval
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "retry": {"initial_interval": "-1s"}}]}');
-- 15. a missing function
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.nope"}]}');
-- 16. a function with the wrong return type
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.wrong_return"}]}');
-- 17. a function with the wrong arguments
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.wrong_args"}]}');
-- 18. an unqualified function name
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "record"}]}');
-- 19. a bad jsonpath in when
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "when": "$.steps.x ==="}]}');
-- 20. a sql step without a function
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql"}]}');
-- 21. an unknown kind
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "lambda"}]}');
-- 22. a sleep with both duration and until
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "nap", "kind": "sleep", "duration": "1s", "until": "$.input.at"}]}');
-- 23. retry values out of range
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "retry": {"max_attempts": 2.5}}]}');
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "retry": {"backoff_coefficient": 0.5}}]}');
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "retry": {"initial_interval": "1m", "max_interval": "1s"}}]}');
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "retry": {"jitter": "some"}}]}');
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record", "retry": {"non_retryable": ["sometimes"]}}]}');
-- 24. a step name that a jsonpath could not reach
SELECT pg_temp.try_define('bad', '{"steps": [{"name": "send-mail", "kind": "sql", "function": "app.record"}]}');
-- 25. a bad workflow name
SELECT pg_temp.try_define('', '{"steps": [{"name": "a", "kind": "sql", "function": "app.record"}]}');

-- Nothing of the rejected definitions was stored.
SELECT count(*) FROM orch.workflows WHERE name IN ('bad', '');
