-- The engine: branches, skips, fan-in, sleeps, failures, retries, timeouts.

-- Guards pick one branch; the fan-in step runs after whichever branch ran.
SELECT orch.define_workflow('triage', '{"steps": [
  {"name": "classify", "kind": "sql", "function": "app.classify"},
  {"name": "refund",   "kind": "sql", "function": "app.record", "needs": ["classify"],
   "when": "$.steps.classify.kind == \"refund\""},
  {"name": "refund_mail", "kind": "sql", "function": "app.record", "needs": ["refund"]},
  {"name": "answer",   "kind": "sql", "function": "app.record", "needs": ["classify"],
   "when": "$.steps.classify.kind != \"refund\""},
  {"name": "close",    "kind": "sql", "function": "app.record", "needs": ["refund_mail", "answer"]}]}');

SELECT orch.start_run('triage', '{"kind": "refund", "amount": 10}') AS refund_run \gset
SELECT orch.start_run('triage', '{"kind": "question"}') AS question_run \gset
SELECT orch.wait_run(:'refund_run', '30s') AS refund, orch.wait_run(:'question_run', '30s') AS question;

-- The refund branch ran; the answer branch was skipped; each step saw the outputs
-- of the steps before it, and close saw the refund branch.
SELECT name, status, ARRAY(SELECT jsonb_object_keys(output->'saw') ORDER BY 1) AS saw,
	   output - 'saw' AS output
  FROM orch.steps WHERE run_id = :'refund_run' ORDER BY step_id;
-- Skips propagate down a branch whose every need was skipped, but not into the fan-in.
SELECT name, status, output->'skipped' AS skipped FROM orch.steps WHERE run_id = :'question_run' ORDER BY step_id;
-- The run's output holds the output of each step that succeeded.
SELECT jsonb_object_keys(output) FROM orch.runs WHERE run_id = :'question_run' ORDER BY 1;
-- Each step that ran wrote its effect exactly once; skipped steps wrote nothing.
SELECT step, count(*) FROM app.effects WHERE run_id IN (:'refund_run', :'question_run')
 GROUP BY step ORDER BY step;

-- A durable sleep: the step waits, then succeeds.
SELECT orch.define_workflow('nap', '{"steps": [
  {"name": "nap",  "kind": "sleep", "duration": "300ms"},
  {"name": "until", "kind": "sleep", "until": "$.input.wake_at", "needs": ["nap"]},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["until"]}]}');
SELECT orch.start_run('nap', jsonb_build_object('wake_at', now() + interval '100ms')) AS nap_run \gset
SELECT orch.wait_run(:'nap_run', '30s');
SELECT name, status, (finished_at - started_at) >= interval '300ms' AS slept_long_enough
  FROM orch.steps WHERE run_id = :'nap_run' AND name = 'nap';
SELECT name, status FROM orch.steps WHERE run_id = :'nap_run' ORDER BY step_id;

-- A step that raises: the attempt records message, SQLSTATE, detail, hint and context;
-- with no attempts left the run fails, naming the step, and later steps are cancelled.
SELECT orch.define_workflow('refund', '{"steps": [
  {"name": "check",  "kind": "sql", "function": "app.record"},
  {"name": "refund", "kind": "sql", "function": "app.broken", "needs": ["check"],
   "retry": {"max_attempts": 1}},
  {"name": "notify", "kind": "sql", "function": "app.record", "needs": ["refund"]}]}');
SELECT orch.start_run('refund', '{"amount": 1000}') AS failed_run \gset
SELECT orch.wait_run(:'failed_run', '30s');
SELECT error->>'step' AS step, error->>'attempt' AS attempt, error->>'class' AS class,
	   error->>'sqlstate' AS sqlstate, error->>'message' AS message
  FROM orch.runs WHERE run_id = :'failed_run';
SELECT name, status FROM orch.steps WHERE run_id = :'failed_run' ORDER BY step_id;
SELECT a.attempt, outcome, error_class, sqlstate, message, detail, hint,
	   context LIKE 'PL/pgSQL function app.broken(jsonb)%' AS context_names_function
  FROM orch.attempts a JOIN orch.steps s USING (step_id)
 WHERE s.run_id = :'failed_run' AND s.name = 'refund';
-- The failed attempt's own writes were rolled back with it.
SELECT step, count(*) FROM app.effects WHERE run_id = :'failed_run' GROUP BY step ORDER BY step;

-- Retries: a step that fails twice succeeds on its third attempt; its attempts are recorded
-- in order, spaced by at least the backoff, and only the successful attempt's write remains.
SELECT orch.define_workflow('flaky', '{"steps": [
  {"name": "call", "kind": "sql", "function": "app.flaky",
   "retry": {"max_attempts": 3, "initial_interval": "50ms", "backoff_coefficient": 2}}]}');
SELECT orch.start_run('flaky') AS flaky_run \gset
SELECT orch.wait_run(:'flaky_run', '30s');
SELECT a.attempt, a.outcome, a.error_class, a.sqlstate, a.message
  FROM orch.attempts a WHERE a.run_id = :'flaky_run' ORDER BY a.attempt;
SELECT bool_and(gap >= expected) AS backoff_respected
  FROM (SELECT a.started_at - lag(a.finished_at) OVER (ORDER BY a.attempt) AS gap,
			   interval '50ms' * 2 ^ (a.attempt - 2) AS expected
		  FROM orch.attempts a WHERE a.run_id = :'flaky_run') g
 WHERE gap IS NOT NULL;
SELECT attempt FROM app.effects WHERE run_id = :'flaky_run';
SELECT output FROM orch.steps WHERE run_id = :'flaky_run';

-- non_retryable: a listed SQLSTATE fails at once.
SELECT orch.define_workflow('no_retry', '{"steps": [
  {"name": "call", "kind": "sql", "function": "app.flaky",
   "retry": {"max_attempts": 5, "initial_interval": "10ms", "non_retryable": ["55P03"]}}]}');
SELECT orch.start_run('no_retry') AS no_retry_run \gset
SELECT orch.wait_run(:'no_retry_run', '30s');
SELECT count(*) AS attempts FROM orch.attempts WHERE run_id = :'no_retry_run';

-- A step's timeout is its statement timeout; a timeout is a transient error.
SELECT orch.define_workflow('slow', '{"steps": [
  {"name": "call", "kind": "sql", "function": "app.slow", "timeout": "100ms",
   "retry": {"max_attempts": 1}}]}');
SELECT orch.start_run('slow') AS slow_run \gset
SELECT orch.wait_run(:'slow_run', '30s');
SELECT attempt, error_class, sqlstate, message FROM orch.attempts WHERE run_id = :'slow_run';

-- A function that returns NULL fails its step with a clear message.
SELECT orch.define_workflow('null_result', '{"steps": [
  {"name": "call", "kind": "sql", "function": "app.returns_null", "retry": {"max_attempts": 1}}]}');
SELECT orch.start_run('null_result') AS null_run \gset
SELECT orch.wait_run(:'null_run', '30s');
SELECT sqlstate, message, hint FROM orch.attempts WHERE run_id = :'null_run';

-- A guard that does not yield a boolean fails its step.
SELECT orch.define_workflow('bad_guard', '{"steps": [
  {"name": "call", "kind": "sql", "function": "app.record", "when": "$.input.flag"}]}');
SELECT orch.start_run('bad_guard', '{"flag": "yes"}') AS guard_run \gset
SELECT orch.wait_run(:'guard_run', '30s');
SELECT error->>'message' AS message FROM orch.runs WHERE run_id = :'guard_run';

-- One step of a run fails for good while another step of the same run is ready
-- in the same batch: the run fails once, its other step is either done before
-- the failure or cancelled with it (never run after), and the engine goes on.
SELECT orch.define_workflow('two_heads', '{"steps": [
  {"name": "b", "kind": "sql", "function": "app.record"},
  {"name": "a", "kind": "sql", "function": "app.broken", "retry": {"max_attempts": 1}},
  {"name": "c", "kind": "sql", "function": "app.record", "needs": ["a", "b"]}]}');
CREATE TEMP TABLE two_heads AS
	SELECT orch.start_run('two_heads', jsonb_build_object('i', g)) AS run_id FROM generate_series(1, 5) g;
SELECT orch.wait_run(run_id, '30s') AS status, count(*) FROM two_heads GROUP BY 1;
SELECT count(*) AS consistent_runs
  FROM two_heads h JOIN orch.runs r USING (run_id)
 WHERE r.status = 'failed' AND r.error->>'step' = 'a' AND r.steps_left = 0
   AND (SELECT status FROM orch.steps WHERE run_id = h.run_id AND name = 'c') = 'cancelled'
   AND ((SELECT status FROM orch.steps WHERE run_id = h.run_id AND name = 'b') = 'succeeded')
	   = ((SELECT count(*) FROM app.effects e WHERE e.run_id = h.run_id AND e.step = 'b') = 1)
   AND (SELECT count(*) FROM app.effects e WHERE e.run_id = h.run_id AND e.step IN ('a', 'c')) = 0;
SELECT orch.start_run('flaky') AS after_run \gset
SELECT orch.wait_run(:'after_run', '30s') AS later_run;

-- A run past its deadline is timed out by the engine, on its own timer, and
-- its unfinished steps are cancelled.
SELECT orch.define_workflow('slow_nap', '{"steps": [
  {"name": "nap", "kind": "sleep", "duration": "1h"},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["nap"]}]}');
SELECT orch.start_run('slow_nap', deadline => clock_timestamp() + interval '300ms') AS late_run \gset
SELECT orch.wait_run(:'late_run', '30s');
SELECT error->>'message' AS message, (error->>'steps_cancelled')::int AS steps_cancelled,
	   finished_at >= deadline AS after_deadline
  FROM orch.runs WHERE run_id = :'late_run';
SELECT name, status FROM orch.steps WHERE run_id = :'late_run' ORDER BY step_id;

-- The engine worker of this database, from shared memory.
SELECT database = current_database() AS this_database, pid > 0 AS has_pid, steps_done > 0 AS did_work
  FROM orch.engine_workers;
