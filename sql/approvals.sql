-- Approval steps: role-scoped, quorum, four eyes, bound to the payload they
-- show; orch.approve, orch.reject, orch.pending_approvals; expiry.
\set SHOW_CONTEXT never

CREATE ROLE apr_finance;
CREATE ROLE apr_managers;
CREATE ROLE apr_alice IN ROLE apr_finance, orch_operator;	-- starts the runs
CREATE ROLE apr_bob IN ROLE apr_finance;
CREATE ROLE apr_carol IN ROLE apr_finance;
CREATE ROLE apr_dave;										-- in no approvers role
CREATE ROLE apr_erin IN ROLE apr_managers;

-- what the steps do: draft a refund, then pay what was approved
CREATE FUNCTION app.apr_draft(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_build_object('refund', ctx->'input'->'amount', 'account', ctx->'input'->'account')
$$;
CREATE FUNCTION app.apr_pay(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_build_object('paid', ctx->'steps'->'approve'->'payload'->'refund',
							  'approved_by', ctx->'steps'->'approve'->'approved_by')
$$;
CREATE FUNCTION app.apr_note(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_build_object('noted', ctx->'error'->>'message')
$$;
GRANT EXECUTE ON FUNCTION app.apr_draft(jsonb), app.apr_pay(jsonb), app.apr_note(jsonb) TO PUBLIC;
-- votes as a role, errors with ids masked
CREATE FUNCTION app.apr_as(who text, stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	result text;
BEGIN
	EXECUTE format('SET LOCAL ROLE %I', who);
	result := regexp_replace(app.show_error(stmt), 'approval [0-9]+', 'approval <id>', 'gi');
	RESET ROLE;
	RETURN result;
END
$$;

-- 1. Definitions are validated.
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "approval"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "approval", "approvers": "no_such_role"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "approval", "approvers": "apr_finance", "quorum": 0}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "approval", "approvers": "apr_finance", "on_timeout": "reject"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "approval", "approvers": "apr_finance", "timeout": "1h", "on_timeout": "approve"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "approval", "approvers": "apr_finance", "timeout": "1h",
   "on_timeout": {"escalate": "no_such_role"}}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "approval", "approvers": "apr_finance", "on_reject": "retry"}]}')$$);
SELECT app.show_error($$SELECT orch.define_workflow('bad', '{"steps": [
  {"name": "a", "kind": "approval", "approvers": "apr_finance", "payload": "$.steps."}]}')$$);

/*
 * 2. A gate for two of finance: what they see is fixed when it asks, and the
 * step after it gets exactly what they approved.
 */
SELECT orch.define_workflow('apr_refund', '{"steps": [
  {"name": "draft", "kind": "sql", "function": "app.apr_draft"},
  {"name": "approve", "kind": "approval", "needs": ["draft"], "approvers": "apr_finance",
   "quorum": 2, "payload": "$.steps.draft", "target": "$.input.account", "evidence": "$.input"},
  {"name": "pay", "kind": "sql", "function": "app.apr_pay", "needs": ["approve"]}]}');
SET ROLE apr_alice;
SELECT orch.start_run('apr_refund', '{"amount": 40, "account": "A-1", "reason": "broken"}') AS r1 \gset
RESET ROLE;
SELECT orch.wait_run(:'r1');
SELECT name, status FROM orch.steps WHERE run_id = :'r1' ORDER BY step_id;
SELECT step, approvers, quorum, approvals, payload, target, evidence,
	   payload_hash = encode(sha256(convert_to(jsonb_build_array(payload, target, evidence)::text, 'UTF8')), 'hex') AS hash_binds,
	   expires_at, owner
  FROM orch.pending_approvals WHERE run_id = :'r1';
SELECT approval_id AS a1, payload_hash AS a1_hash FROM orch.pending_approvals WHERE run_id = :'r1' \gset
-- who sees the request, and who may decide it
SET ROLE apr_dave;
SELECT count(*) AS dave_sees FROM orch.pending_approvals WHERE run_id = :'r1';
SET ROLE apr_bob;
SELECT can_approve FROM orch.pending_approvals WHERE approval_id = :a1;
SET ROLE apr_alice;
SELECT can_approve FROM orch.pending_approvals WHERE approval_id = :a1;
RESET ROLE;

-- 3. Refusals, each changing nothing: not a member, the run's owner (four
-- eyes), a payload other than the one shown, an unknown request, no reason.
SELECT app.apr_as('apr_dave', format('SELECT orch.approve(%s)', :a1));
SELECT app.apr_as('apr_alice', format('SELECT orch.approve(%s)', :a1));
SELECT app.apr_as('apr_bob', format('SELECT orch.approve(%s, %L, %L::bytea)', :a1, 'ok', '\x00'));
SELECT app.apr_as('apr_bob', 'SELECT orch.approve(-1)');
SELECT app.apr_as('apr_bob', format('SELECT orch.reject(%s, %L)', :a1, ' '));
-- a vote under a group role is refused: one member could otherwise count twice
SELECT app.apr_as('apr_finance', format('SELECT orch.approve(%s)', :a1));
SELECT count(*) AS votes FROM orch.approval_votes WHERE approval_id = :a1;

-- 4. The quorum: bob, then carol; bob cannot vote twice.
SELECT app.apr_as('apr_bob', format('SELECT orch.approve(%s, %L, decode(%L, %L))', :a1, 'amount checked', :'a1_hash', 'hex'));
SELECT app.apr_as('apr_bob', format('SELECT orch.approve(%s)', :a1));
SELECT status FROM orch.runs WHERE run_id = :'r1';
SELECT app.apr_as('apr_carol', format('SELECT orch.approve(%s, %L)', :a1, 'fine'));
SELECT orch.wait_run(:'r1');
SELECT name, status, output FROM orch.steps WHERE run_id = :'r1' AND name IN ('approve', 'pay') ORDER BY step_id;
SELECT voter, decision, comment, self_approval FROM orch.approval_votes WHERE approval_id = :a1 ORDER BY voted_at;
-- decided: no more votes
SELECT app.apr_as('apr_carol', format('SELECT orch.reject(%s, %L)', :a1, 'too late'));
-- every request and vote is in the audit trail, with who
SELECT table_name, operation, db_user, coalesce(new_row->>'decision', new_row->>'status') AS what
  FROM orch.audit_log
 WHERE table_name IN ('orch.approvals', 'orch.approval_votes')
   AND coalesce(new_row->>'approval_id', row_key->>'approval_id')::bigint = :a1
 ORDER BY at, audit_id;

-- 5. One rejection decides: the run fails, naming who and why.
SET ROLE apr_alice;
SELECT orch.start_run('apr_refund', '{"amount": 9000, "account": "A-2"}') AS r2 \gset
RESET ROLE;
SELECT orch.wait_run(:'r2');
SELECT app.apr_as('apr_bob', format('SELECT orch.reject(approval_id, %L) FROM orch.pending_approvals WHERE run_id = %L',
									'amount over the limit', :'r2'));
SELECT orch.wait_run(:'r2');
SELECT error->>'step' AS step, error->>'sqlstate' AS sqlstate,
	   regexp_replace(error->>'message', '[0-9]+', 'N') AS message, error->>'gave_up' AS gave_up
  FROM orch.runs WHERE run_id = :'r2';

-- A redrive asks again: a new request, for the payload the step would act on now.
SELECT orch.retry_run(:'r2', 'asking again');
SELECT orch.wait_run(:'r2');
SELECT status, payload->'refund' AS refund FROM orch.approvals WHERE run_id = :'r2' ORDER BY approval_id;

-- 6. on_reject goes to a step instead; four eyes can be waived, and that is recorded.
SELECT orch.define_workflow('small_refund', '{"steps": [
  {"name": "approve", "kind": "approval", "approvers": "apr_finance", "allow_self_approval": true,
   "on_reject": {"goto": "note"}},
  {"name": "note", "kind": "sql", "function": "app.apr_note"}]}');
SET ROLE apr_alice;
SELECT orch.start_run('small_refund', '{"amount": 5}') AS r3 \gset
SELECT orch.start_run('small_refund', '{"amount": 6}') AS r4 \gset
RESET ROLE;
SELECT orch.wait_run(:'r3'), orch.wait_run(:'r4');
SELECT app.apr_as('apr_alice', format('SELECT orch.approve(approval_id) FROM orch.pending_approvals WHERE run_id = %L', :'r3'));
SELECT app.apr_as('apr_carol', format('SELECT orch.reject(approval_id, %L) FROM orch.pending_approvals WHERE run_id = %L',
									  'not needed', :'r4'));
SELECT orch.wait_run(:'r3'), orch.wait_run(:'r4');
SELECT v.voter, v.self_approval FROM orch.approval_votes v JOIN orch.approvals a USING (approval_id)
 WHERE a.run_id = :'r3';
SELECT name, status, regexp_replace(output->>'noted', '[0-9]+', 'N') AS noted
  FROM orch.steps WHERE run_id = :'r4' ORDER BY step_id;

-- 7. Expiry: reject (the default), or the human queue; a late vote is refused.
SELECT orch.define_workflow('expiring', '{"steps": [
  {"name": "approve", "kind": "approval", "approvers": "apr_finance", "timeout": "100ms"}]}');
SELECT orch.start_run('expiring') AS r5 \gset
SELECT app.await(format($$SELECT count(*) = 1 FROM orch.approvals WHERE run_id = %L$$, :'r5'));
SELECT approval_id AS a5 FROM orch.approvals WHERE run_id = :'r5' \gset
SELECT app.await(format($$SELECT status = 'failed' FROM orch.runs WHERE run_id = %L$$, :'r5'));
SELECT error->>'sqlstate' AS sqlstate, error->>'gave_up' AS gave_up FROM orch.runs WHERE run_id = :'r5';
SELECT status FROM orch.approvals WHERE approval_id = :a5;
SELECT app.apr_as('apr_bob', format('SELECT orch.approve(%s)', :a5));

SELECT orch.define_workflow('expiring_human', '{"steps": [
  {"name": "approve", "kind": "approval", "approvers": "apr_finance", "timeout": "100ms",
   "on_timeout": "human"}]}');
SELECT orch.start_run('expiring_human') AS r6 \gset
SELECT app.await(format($$SELECT status = 'needs_human' FROM orch.runs WHERE run_id = %L$$, :'r6'));
SELECT step, kind, why FROM orch.human_queue WHERE run_id = :'r6';
-- a person in the human queue cannot stand in for the approvers
SELECT app.hq_error(format('SELECT orch.resolve(%s, %L, %L)', step_id, 'provide_input', '{"approved": true}'))
  FROM orch.human_queue WHERE run_id = :'r6';
SELECT app.hq_error(format('SELECT orch.resolve(%s, %L)', step_id, 'skip'))
  FROM orch.human_queue WHERE run_id = :'r6';
-- a retry asks again: a new request; the expired one stays expired
SELECT orch.resolve(step_id, 'retry') FROM orch.human_queue WHERE run_id = :'r6';
SELECT app.await(format($$SELECT count(*) = 2 FROM orch.approvals WHERE run_id = %L$$, :'r6'));
SELECT approval_id = min(approval_id) OVER () AS first, payload_hash = lag(payload_hash) OVER (ORDER BY approval_id) AS same_payload,
	   CASE WHEN approval_id = min(approval_id) OVER () THEN status END AS first_status
  FROM orch.approvals WHERE run_id = :'r6' ORDER BY approval_id;

-- 8. Escalation: an expired request goes once to another role, with a new timeout.
SELECT orch.define_workflow('escalating', '{"steps": [
  {"name": "approve", "kind": "approval", "approvers": "apr_finance", "timeout": "100ms",
   "on_timeout": {"escalate": "apr_managers"}}]}');
SELECT orch.start_run('escalating') AS r7 \gset
SELECT app.await(format($$SELECT count(*) = 2 FROM orch.approvals WHERE run_id = %L$$, :'r7'));
SELECT approvers, escalated_from IS NOT NULL AS escalated FROM orch.approvals
 WHERE run_id = :'r7' ORDER BY approval_id;
SELECT app.await(format($$SELECT status = 'failed' FROM orch.runs WHERE run_id = %L$$, :'r7'));
SELECT error->>'gave_up' AS gave_up FROM orch.runs WHERE run_id = :'r7';

SELECT orch.define_workflow('escalating_slow', '{"steps": [
  {"name": "approve", "kind": "approval", "approvers": "apr_finance", "timeout": "1h",
   "on_timeout": {"escalate": "apr_managers"}}]}');
SELECT orch.start_run('escalating_slow') AS r8 \gset
SELECT app.await(format($$SELECT status = 'needs_approval' FROM orch.runs WHERE run_id = %L$$, :'r8'));
-- make the first request expire now, as an hour passing would
UPDATE orch.approvals SET expires_at = now() WHERE run_id = :'r8';
UPDATE orch.steps SET wake_at = now() WHERE run_id = :'r8';
SELECT app.await(format($$SELECT count(*) = 2 FROM orch.approvals WHERE run_id = %L$$, :'r8'));
SELECT approval_id AS a8, approvers FROM orch.approvals WHERE run_id = :'r8' AND status = 'pending' \gset
SELECT :'approvers' AS escalated_to;
-- finance may no longer decide it; managers may
SELECT app.apr_as('apr_bob', format('SELECT orch.approve(%s)', :a8));
SELECT app.apr_as('apr_erin', format('SELECT orch.approve(%s)', :a8));
SELECT orch.wait_run(:'r8');

-- 9. A cancelled run's request is moot.
SET ROLE apr_alice;
SELECT orch.start_run('apr_refund', '{"amount": 1, "account": "A-3"}') AS r9 \gset
RESET ROLE;
SELECT orch.wait_run(:'r9');
SELECT approval_id AS a9 FROM orch.pending_approvals WHERE run_id = :'r9' \gset
SELECT orch.cancel_run(:'r9');
SELECT app.apr_as('apr_bob', format('SELECT orch.approve(%s)', :a9));
SELECT count(*) FROM orch.pending_approvals WHERE run_id = :'r9';

-- 10. The approvers role is dropped while a request waits: the view still
-- works for everyone, and a vote says what is wrong.
CREATE ROLE apr_temp;
SELECT orch.define_workflow('apr_temp_gate', '{"steps": [
  {"name": "approve", "kind": "approval", "approvers": "apr_temp"}]}');
SELECT orch.start_run('apr_temp_gate') AS r10 \gset
SELECT orch.wait_run(:'r10');
SELECT approval_id AS a10 FROM orch.approvals WHERE run_id = :'r10' \gset
DROP ROLE apr_temp;
SELECT count(*) AS listed, bool_or(can_approve) AS anyone FROM orch.pending_approvals WHERE run_id = :'r10';
SELECT app.apr_as('apr_bob', format('SELECT orch.approve(%s)', :a10));
SELECT orch.cancel_run(:'r10');

DROP ROLE apr_alice, apr_bob, apr_carol, apr_dave, apr_erin;
