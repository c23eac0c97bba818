-- A step that makes the engine's own batch fail (not its function, which
-- runs in a subtransaction) is set aside for a human, and the other runs of
-- the database go on.
\set SHOW_CONTEXT never

-- Something outside the step breaks: here a trigger on orch.attempts that
-- refuses the attempt rows of one step.
CREATE FUNCTION app.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	IF (SELECT name FROM orch.steps WHERE step_id = NEW.step_id) = 'poison' THEN
		RAISE EXCEPTION 'attempt rows of step poison are refused' USING ERRCODE = 'check_violation';
	END IF;
	RETURN NEW;
END
$$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON orch.attempts
	FOR EACH ROW EXECUTE FUNCTION app.refuse_poison();

SELECT orch.define_workflow('poisoned', '{"steps": [
  {"name": "poison", "kind": "sql", "function": "app.record"},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["poison"]}]}');
SELECT orch.define_workflow('healthy', '{"steps": [
  {"name": "one", "kind": "sql", "function": "app.record"},
  {"name": "two", "kind": "sql", "function": "app.record", "needs": ["one"]}]}');

-- Started together, so that the first batch holds both kinds.
BEGIN;
CREATE TABLE app.q_runs AS
SELECT orch.start_run(CASE WHEN g % 2 = 0 THEN 'poisoned' ELSE 'healthy' END,
					  jsonb_build_object('n', g)) AS run_id
  FROM generate_series(1, 6) g;
COMMIT;

SELECT app.await($$SELECT count(*) = 3 FROM orch.runs r JOIN app.q_runs USING (run_id)
					WHERE r.workflow = 'healthy' AND r.status = 'succeeded'$$) AS healthy_done;
SELECT app.await($$SELECT count(*) = 3 FROM orch.runs r JOIN app.q_runs USING (run_id)
					WHERE r.workflow = 'poisoned' AND r.status = 'needs_human'$$) AS poisoned_aside;
SELECT s.name, s.status, s.error->>'class' AS class, s.error->>'sqlstate' AS sqlstate,
	   s.error->>'message' AS message, s.error->>'gave_up' AS gave_up, count(*)
  FROM orch.steps s JOIN app.q_runs USING (run_id)
 WHERE s.name IN ('poison', 'after')
 GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1;
-- the step's effect was rolled back with its batch
SELECT count(*) FROM app.effects e JOIN app.q_runs USING (run_id) WHERE e.step = 'poison';

-- Once the cause is gone, a redrive finishes the run.
DROP TRIGGER refuse_poison ON orch.attempts;
SELECT orch.retry_run(run_id) FROM app.q_runs q JOIN orch.runs r USING (run_id)
 WHERE r.workflow = 'poisoned' ORDER BY r.input->>'n' LIMIT 1;
SELECT app.await($$SELECT count(*) = 1 FROM orch.runs r JOIN app.q_runs USING (run_id)
					WHERE r.workflow = 'poisoned' AND r.status = 'succeeded'$$) AS redriven;
