-- subworkflow steps: a child run per attempt, its output the step's, and
-- cancellation from parent to child.
\set SHOW_CONTEXT never

SELECT orch.define_workflow('sub_child', '{"steps": [
  {"name": "pick", "kind": "sql", "function": "app.record"},
  {"name": "pack", "kind": "sql", "function": "app.record", "needs": ["pick"]}]}');
SELECT orch.define_workflow('sub_waiting', '{"steps": [
  {"name": "wait", "kind": "wait_event", "event": "go"}]}');
CREATE FUNCTION app.sub_prepare(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_build_object('order', ctx->'input'->'order', 'items', 3)
$$;

-- 1. Definitions are validated.
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "subworkflow"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "subworkflow", "workflow": "no_such_workflow"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "subworkflow", "workflow": "bad"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "subworkflow", "workflow": "sub_child", "input": "$.steps["}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "subworkflow", "workflow": "sub_child", "timeout": "1h"}]}')$$);
-- workflows that would start each other without end are refused, in either order
SELECT orch.define_workflow('sub_cycle_a', '{"steps": [
  {"name": "a", "kind": "subworkflow", "workflow": "sub_child"}]}');
SELECT orch.define_workflow('sub_cycle_b', '{"steps": [
  {"name": "b", "kind": "subworkflow", "workflow": "sub_cycle_a"}]}');
SELECT app.show_error($$SELECT orch.define_workflow('sub_cycle_a', '{"steps": [
  {"name": "a", "kind": "map", "workflow": "sub_cycle_b", "items": "$.input.xs"}]}')$$);

-- 2. The child runs with the input the step selects; the parent goes on with its output.
SELECT orch.define_workflow('sub_parent', '{"steps": [
  {"name": "prepare", "kind": "sql", "function": "app.sub_prepare"},
  {"name": "fulfil", "kind": "subworkflow", "workflow": "sub_child", "input": "$.steps.prepare",
   "needs": ["prepare"]},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["fulfil"]}]}');
SELECT orch.start_run('sub_parent', '{"order": 7}', business_key => 'ORDER-7', priority => 3) AS p1 \gset
SELECT orch.wait_run(:'p1');
SELECT c.workflow, c.status, c.input, c.business_key, c.priority, c.owner = p.owner AS same_owner,
	   s.name AS parent_step
  FROM orch.runs c JOIN orch.runs p ON p.run_id = c.parent_run_id
  JOIN orch.steps s ON s.step_id = c.parent_step_id
 WHERE c.parent_run_id = :'p1';
SELECT name, status, output->'pack'->>'step' AS child_pack, attempt
  FROM orch.steps WHERE run_id = :'p1' AND name = 'fulfil';
SELECT output->'saw'->'fulfil'->'pick'->'input' AS after_saw FROM orch.steps
 WHERE run_id = :'p1' AND name = 'after';

-- 3. A child that fails fails the attempt; the retry policy starts another child.
SELECT orch.define_workflow('sub_broken', '{"steps": [
  {"name": "boom", "kind": "sql", "function": "app.broken", "retry": {"max_attempts": 1}}]}');
SELECT orch.define_workflow('sub_retrying', '{"steps": [
  {"name": "try", "kind": "subworkflow", "workflow": "sub_broken",
   "retry": {"max_attempts": 2, "initial_interval": "10ms"}}]}');
SELECT orch.start_run('sub_retrying') AS p2 \gset
SELECT orch.wait_run(:'p2');
SELECT count(*) AS children, bool_and(status = 'failed') AS all_failed FROM orch.runs WHERE parent_run_id = :'p2';
SELECT error->>'step' AS step, error->>'gave_up' AS gave_up,
	   regexp_replace(error->>'message', '[0-9a-f]{8}-[0-9a-f-]{27}', '<run>') AS message
  FROM orch.runs WHERE run_id = :'p2';
SELECT attempt, outcome FROM orch.attempts WHERE run_id = :'p2' ORDER BY attempt;

-- An input that is not an object fails the attempt, and starts no child.
SELECT orch.define_workflow('sub_bad_input', '{"steps": [
  {"name": "fulfil", "kind": "subworkflow", "workflow": "sub_child", "input": "$.input.order",
   "retry": {"max_attempts": 1}}]}');
SELECT orch.start_run('sub_bad_input', '{"order": 7}') AS p3 \gset
SELECT orch.wait_run(:'p3');
SELECT error->>'message' AS message FROM orch.runs WHERE run_id = :'p3';
SELECT count(*) AS children FROM orch.runs WHERE parent_run_id = :'p3';

-- 4. Cancelling the parent cancels the child.
SELECT orch.define_workflow('sub_holder', '{"steps": [
  {"name": "hold", "kind": "subworkflow", "workflow": "sub_waiting"}]}');
SELECT orch.start_run('sub_holder') AS p4 \gset
SELECT app.await(format($$SELECT count(*) = 1 FROM orch.runs WHERE parent_run_id = %L AND status = 'running'$$, :'p4'));
SELECT orch.cancel_run(:'p4');
SELECT status, error->>'cancelled_by' AS cancelled_by FROM orch.runs WHERE parent_run_id = :'p4';
SELECT s.status FROM orch.steps s JOIN orch.runs c ON c.run_id = s.run_id WHERE c.parent_run_id = :'p4';

-- A parent that fails cancels its children too.
SELECT orch.define_workflow('sub_failing', '{"steps": [
  {"name": "hold", "kind": "subworkflow", "workflow": "sub_waiting"},
  {"name": "wait_a_bit", "kind": "sleep", "duration": "200ms"},
  {"name": "boom", "kind": "sql", "function": "app.broken", "needs": ["wait_a_bit"],
   "retry": {"max_attempts": 1}}]}');
SELECT orch.start_run('sub_failing') AS p5 \gset
SELECT orch.wait_run(:'p5');
SELECT status FROM orch.runs WHERE parent_run_id = :'p5';

-- 5. A child that finishes while the parent waits wakes it: an event to the child.
SELECT orch.start_run('sub_holder') AS p6 \gset
SELECT app.await(format($$SELECT count(*) = 1 FROM orch.steps s JOIN orch.runs c USING (run_id)
						   WHERE c.parent_run_id = %L AND s.status = 'waiting'$$, :'p6'));
SELECT orch.send_event(run_id, 'go', '{"ok": true}') > 0 AS sent FROM orch.runs WHERE parent_run_id = :'p6';
SELECT orch.wait_run(:'p6');
SELECT output FROM orch.steps WHERE run_id = :'p6';

/*
 * Map steps: the workflow once per item, at most max_concurrency at a time,
 * results in item order, failures tolerated up to a count or a percentage.
 */
CREATE FUNCTION app.sub_square(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	IF (ctx->'input'->>'item')::int < 0 THEN
		RAISE EXCEPTION 'item % is negative', ctx->'input'->>'item' USING ERRCODE = 'ORPRM';
	END IF;
	RETURN jsonb_build_object('square', (ctx->'input'->>'item')::int ^ 2, 'index', ctx->'input'->'index');
END
$$;
SELECT orch.define_workflow('sub_item', '{"steps": [
  {"name": "square", "kind": "sql", "function": "app.sub_square", "retry": {"max_attempts": 1}}]}');
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "m", "kind": "map", "workflow": "sub_item"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "m", "kind": "map", "workflow": "sub_item", "items": "$.input.xs", "max_concurrency": 0}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "m", "kind": "map", "workflow": "sub_item", "items": "$.input.xs", "tolerated_failures": "150%"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "m", "kind": "map", "workflow": "sub_item", "items": "$.input.xs", "input": "$"}]}')$$);

SELECT orch.define_workflow('sub_map', '{"steps": [
  {"name": "squares", "kind": "map", "workflow": "sub_item", "items": "$.input.xs",
   "max_concurrency": 2, "tolerated_failures": "25%",
   "retry": {"max_attempts": 2, "initial_interval": "10ms"}},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["squares"]}]}');
-- 6. All succeed: the results in item order.
SELECT orch.start_run('sub_map', '{"xs": [3, 1, 4, 1, 5]}') AS m1 \gset
SELECT orch.wait_run(:'m1');
SELECT output FROM orch.steps WHERE run_id = :'m1' AND name = 'squares';
SELECT array_agg(parent_item ORDER BY parent_item) AS items, bool_and(parent_attempt = 1) AS first_attempt
  FROM orch.runs WHERE parent_run_id = :'m1';
-- one of four fails: 25% tolerated, its result is null
SELECT orch.start_run('sub_map', '{"xs": [2, -1, 3, 4]}') AS m2 \gset
SELECT orch.wait_run(:'m2');
SELECT output FROM orch.steps WHERE run_id = :'m2' AND name = 'squares';
-- two of four fail: more than tolerated; the step fails (its retry policy
-- allows 2 attempts, each a new set of children, both failing alike)
SELECT orch.start_run('sub_map', '{"xs": [-2, -1, 3, 4]}') AS m3 \gset
SELECT orch.wait_run(:'m3');
SELECT error->>'step' AS step, error->>'message' AS message, error->>'gave_up' AS gave_up
  FROM orch.runs WHERE run_id = :'m3';
SELECT max(parent_attempt) AS attempts FROM orch.runs WHERE parent_run_id = :'m3';
-- no items: nothing to run; not an array: the step fails
SELECT orch.start_run('sub_map', '{"xs": []}') AS m4 \gset
SELECT orch.wait_run(:'m4');
SELECT output FROM orch.steps WHERE run_id = :'m4' AND name = 'squares';
SELECT orch.start_run('sub_map', '{"xs": 7}') AS m5 \gset
SELECT orch.wait_run(:'m5');
SELECT error->>'message' AS message FROM orch.runs WHERE run_id = :'m5';

-- 7. At most max_concurrency children run at once; each end starts the next.
SELECT orch.define_workflow('sub_map_waiting', '{"steps": [
  {"name": "each", "kind": "map", "workflow": "sub_waiting", "items": "$.input.xs",
   "max_concurrency": 2}]}');
SELECT orch.start_run('sub_map_waiting', '{"xs": ["a", "b", "c"]}') AS m6 \gset
SELECT app.await(format($$SELECT count(*) = 2 FROM orch.steps s JOIN orch.runs c USING (run_id)
						   WHERE c.parent_run_id = %L AND s.status = 'waiting'$$, :'m6'));
SELECT count(*) AS children FROM orch.runs WHERE parent_run_id = :'m6';
SELECT orch.send_event(run_id, 'go', jsonb_build_object('n', parent_item)) > 0 AS sent
  FROM orch.runs WHERE parent_run_id = :'m6' AND parent_item = 1;
SELECT app.await(format($$SELECT count(*) = 3 FROM orch.runs WHERE parent_run_id = %L$$, :'m6'));
SELECT app.await(format($$SELECT count(*) = 2 FROM orch.steps s JOIN orch.runs c USING (run_id)
						   WHERE c.parent_run_id = %L AND s.status = 'waiting'$$, :'m6'));
SELECT orch.send_event(run_id, 'go', jsonb_build_object('n', parent_item)) > 0 AS sent
  FROM orch.runs WHERE parent_run_id = :'m6' AND status = 'running' ORDER BY parent_item;
SELECT orch.wait_run(:'m6');
SELECT output FROM orch.steps WHERE run_id = :'m6';
-- cancelling a map cancels the children still running
SELECT orch.start_run('sub_map_waiting', '{"xs": ["a", "b", "c"]}') AS m7 \gset
SELECT app.await(format($$SELECT count(*) = 2 FROM orch.steps s JOIN orch.runs c USING (run_id)
						   WHERE c.parent_run_id = %L AND s.status = 'waiting'$$, :'m7'));
SELECT orch.cancel_run(:'m7');
SELECT status, count(*) FROM orch.runs WHERE parent_run_id = :'m7' GROUP BY status;
