-- wait_event steps, orch.send_event and orch.send_event_by_key.
\set SHOW_CONTEXT never

-- 1. Definitions are validated.
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "wait_event"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "wait_event", "event": "has space"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "wait_event", "event": "go", "timeout": "1s", "on_timeout": "retry"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "wait_event", "event": "go", "on_timeout": "skip"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "wait_event", "event": "go", "circuit": "c"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "wait_event", "event": "go", "verify": "app.record"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "sql", "function": "app.record", "event": "go"}]}')$$);

/*
 * 2. An event sent before the run reaches its wait is kept, and taken when
 * it gets there; the first of its name wins, events of other names are left.
 */
SELECT orch.define_workflow('reply', '{"steps": [
  {"name": "ask", "kind": "sleep", "duration": "1s"},
  {"name": "answer", "kind": "wait_event", "event": "answered", "needs": ["ask"]},
  {"name": "use", "kind": "sql", "function": "app.record", "needs": ["answer"]}]}');
SELECT event, on_timeout, timeout FROM orch.workflow_steps WHERE workflow = 'reply' AND name = 'answer';
SELECT orch.start_run('reply') AS e1 \gset
SELECT orch.send_event(:'e1', 'answered', '{"text": "first"}') > 0 AS sent;
SELECT orch.send_event(:'e1', 'answered', '{"text": "second"}') > 0 AS sent;
SELECT orch.send_event(:'e1', 'other', '{}') > 0 AS sent;
SELECT name, consumed_by IS NULL AS kept FROM orch.events WHERE run_id = :'e1' ORDER BY event_id;
SELECT orch.wait_run(:'e1');
SELECT name, status, CASE name WHEN 'answer' THEN output END AS output
  FROM orch.steps WHERE run_id = :'e1' ORDER BY step_id;
SELECT e.name, e.payload->>'text' AS text, s.name AS taken_by, e.sent_by = current_user AS sent_by_me
  FROM orch.events e LEFT JOIN orch.steps s ON s.step_id = e.consumed_by
 WHERE e.run_id = :'e1' ORDER BY e.event_id;
-- the step that uses it sees the payload as the step's output
SELECT output->'saw'->'answer' AS use_saw FROM orch.steps WHERE run_id = :'e1' AND name = 'use';

-- 3. An event sent while the step waits wakes it.
SELECT orch.define_workflow('wait_first', '{"steps": [
  {"name": "answer", "kind": "wait_event", "event": "answered"}]}');
SELECT orch.start_run('wait_first') AS e2 \gset
SELECT app.await(format($$SELECT status = 'waiting' FROM orch.steps WHERE run_id = %L$$, :'e2'));
SELECT status, wake_at = 'infinity' AS waits_without_timer FROM orch.steps WHERE run_id = :'e2';
SELECT orch.send_event(:'e2', 'answered', '{"n": 2}') > 0 AS sent;
SELECT orch.wait_run(:'e2');
SELECT output FROM orch.steps WHERE run_id = :'e2';

-- 4. Two steps wait for the same name: each takes one event.
SELECT orch.define_workflow('two_waits', '{"steps": [
  {"name": "left", "kind": "wait_event", "event": "token"},
  {"name": "right", "kind": "wait_event", "event": "token"}]}');
SELECT orch.start_run('two_waits') AS e3 \gset
SELECT orch.send_event(:'e3', 'token', jsonb_build_object('n', n)) > 0 AS sent FROM generate_series(1, 2) n;
SELECT orch.wait_run(:'e3');
SELECT array_agg(output->>'n' ORDER BY output->>'n') AS taken FROM orch.steps WHERE run_id = :'e3';
SELECT count(*) FILTER (WHERE consumed_by IS NULL) AS left_over FROM orch.events WHERE run_id = :'e3';

-- 5. Timeouts: fail (with on_error applying), skip, human.
SELECT orch.define_workflow('deadline', '{"steps": [
  {"name": "answer", "kind": "wait_event", "event": "answered", "timeout": "100ms"},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["answer"]}]}');
SELECT orch.start_run('deadline') AS t1 \gset
SELECT orch.wait_run(:'t1');
SELECT error->>'step' AS step, error->>'sqlstate' AS sqlstate, error->>'class' AS class,
	   error->>'message' AS message, error->>'gave_up' AS gave_up
  FROM orch.runs WHERE run_id = :'t1';
SELECT a.attempt, a.outcome, a.sqlstate FROM orch.attempts a WHERE a.run_id = :'t1';
-- too late: the run has ended
SELECT app.show_error(format('SELECT orch.send_event(%L, %L)', :'t1', 'answered'));

SELECT orch.define_workflow('deadline_routed', '{"steps": [
  {"name": "answer", "kind": "wait_event", "event": "answered", "timeout": "100ms",
   "on_error": [{"errors": ["ORTMO"], "goto": "remind"}]},
  {"name": "remind", "kind": "sql", "function": "app.record"}]}');
SELECT orch.start_run('deadline_routed') AS t2 \gset
SELECT orch.wait_run(:'t2');
SELECT name, status FROM orch.steps WHERE run_id = :'t2' ORDER BY step_id;

SELECT orch.define_workflow('deadline_skip', '{"steps": [
  {"name": "answer", "kind": "wait_event", "event": "answered", "timeout": "100ms",
   "on_timeout": "skip"},
  {"name": "fallback", "kind": "sql", "function": "app.record"},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["answer", "fallback"]}]}');
SELECT orch.start_run('deadline_skip') AS t3 \gset
SELECT orch.wait_run(:'t3');
SELECT name, status, output->>'skipped' AS why FROM orch.steps WHERE run_id = :'t3' ORDER BY step_id;

SELECT orch.define_workflow('deadline_human', '{"steps": [
  {"name": "answer", "kind": "wait_event", "event": "answered", "timeout": "100ms",
   "on_timeout": "human"},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["answer"]}]}');
SELECT orch.start_run('deadline_human') AS t4 \gset
SELECT orch.wait_run(:'t4');
SELECT step, kind, why, error->>'sqlstate' AS sqlstate FROM orch.human_queue WHERE run_id = :'t4';
-- a person stands in for the event
SELECT orch.resolve(step_id, 'provide_input', '{"answered_by": "phone"}') FROM orch.human_queue
 WHERE run_id = :'t4';
SELECT orch.wait_run(:'t4');
SELECT output->'saw'->'answer' AS after_saw FROM orch.steps WHERE run_id = :'t4' AND name = 'after';

-- 6. A paused run keeps its event until it resumes.
SELECT orch.start_run('wait_first') AS e4 \gset
SELECT app.await(format($$SELECT status = 'waiting' FROM orch.steps WHERE run_id = %L$$, :'e4'));
SELECT orch.pause_run(:'e4');
SELECT orch.send_event(:'e4', 'answered', '{"n": 4}') > 0 AS sent;
SELECT app.await(format($$SELECT wake_at = 'infinity' FROM orch.steps WHERE run_id = %L$$, :'e4'));
SELECT s.status, e.consumed_by IS NULL AS kept
  FROM orch.steps s JOIN orch.events e USING (run_id) WHERE s.run_id = :'e4';
SELECT orch.resume_run(:'e4');
SELECT orch.wait_run(:'e4');
SELECT output FROM orch.steps WHERE run_id = :'e4';

-- 7. send_event's refusals.
SELECT app.show_error('SELECT orch.send_event(''00000000-0000-0000-0000-000000000000'', ''answered'')');
SELECT app.show_error(format('SELECT orch.send_event(%L, %L)', :'e4', 'has space'));
SELECT app.show_error(format('SELECT orch.send_event(%L, NULL)', :'e4'));
SELECT app.show_error(format('SELECT orch.send_event(%L, %L, NULL)', :'e4', 'answered'));
CREATE ROLE ev_reader;
GRANT orch_reader TO ev_reader;
SET ROLE ev_reader;
SELECT app.show_error(format('SELECT orch.send_event(%L, %L)', :'e4', 'answered'));
RESET ROLE;
DROP ROLE ev_reader;

-- 8. By business key: every unfinished run of the workflow with the key.
SELECT orch.start_run('wait_first', business_key => 'T-1') AS k1 \gset
SELECT orch.start_run('wait_first', business_key => 'T-1') AS k2 \gset
SELECT orch.start_run('wait_first', business_key => 'T-2') AS k3 \gset
SELECT orch.send_event_by_key('wait_first', 'T-1', 'answered', '{"by_key": true}');
SELECT orch.wait_run(:'k1'), orch.wait_run(:'k2');
SELECT status FROM orch.runs WHERE run_id = :'k3';
-- the finished runs of the key are left out; no run at all is 0, not an error
SELECT orch.send_event_by_key('wait_first', 'T-1', 'answered');
SELECT orch.send_event_by_key('wait_first', 'T-9', 'answered');
SELECT app.show_error('SELECT orch.send_event_by_key(''no_such_workflow'', ''T-1'', ''answered'')');
SELECT orch.send_event(:'k3', 'answered') > 0 AS sent;
SELECT orch.wait_run(:'k3');

-- 9. Every event is in the audit trail, with who sent it.
SELECT count(*) = (SELECT count(*) FROM orch.events) AS all_audited,
	   bool_and(db_user = current_user) AS by_me
  FROM orch.audit_log WHERE table_name = 'orch.events' AND operation = 'INSERT';
