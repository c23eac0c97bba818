# Failure handling under the real engine worker:
#  1. retry backoff: the attempts of a failing step are spaced at least as
#     the policy says (only lower bounds: a loaded machine may be slower);
#  2. a circuit breaker opens after consecutive failures, blocks the next
#     run's step without burning an attempt, and closes on a successful probe
#     after its cooldown;
#  3. a task whose worker vanished mid-lease: retried by its policy when the
#     step is "idempotent", handed to a human (and not queued again) when not;
#  4. an unknown outcome (ORUNK) is never run again blindly: the "verify"
#     function decides (not applied: retried; applied: succeeded with its
#     output), and without one the step waits for a human.
# Outcomes are awaited by polling or wait_run; "nothing happened" is checked
# after a barrier run that the engine can only finish after any wrongly
# scheduled retry would have come due.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use OrchTest;

my $node = orch_node('failures');
orch_install_app($node, 'postgres');

# Run SQL; its output, or undef (with the error as a diagnostic) when it
# fails, so that a missing feature fails an assertion instead of the file.
sub sql
{
	my ($query) = @_;
	my ($rc, $out, $err) = $node->psql('postgres', $query);
	if ($rc != 0)
	{
		diag("query failed:\n$query\n$err");
		return undef;
	}
	return $out;
}

sub start_run
{
	my ($workflow, $input) = @_;
	$input //= '{}';
	return $node->safe_psql('postgres', "SELECT orch.start_run('$workflow', '$input')");
}

sub wait_run
{
	my ($run) = @_;
	return $node->safe_psql('postgres', "SELECT orch.wait_run('$run', '60s')");
}

# A barrier: a run whose 2 s sleep ends after any retry (the policies here wait
# 1 s at most) that a step stopped before the barrier started could have been
# scheduled for.  The engine takes due steps in wake_at order, so once this
# run has succeeded such a retry would have been run or queued.
sub engine_barrier
{
	my ($what) = @_;
	is(wait_run(start_run('barrier')), 'succeeded', "barrier run finished ($what)");
}

# A task claim by a worker: the token, or '' if nothing came within the wait.
sub claim
{
	my ($queue, $worker, $lease, $wait) = @_;
	$wait //= '10s';
	return $node->safe_psql('postgres',
		"SELECT token FROM orch.claim_tasks('$queue', '$worker', 1, '$lease', wait => '$wait')");
}

$node->safe_psql('postgres', q{
SELECT orch.define_workflow('barrier', '{"steps": [
  {"name": "nap",  "kind": "sleep", "duration": "2s"},
  {"name": "done", "kind": "sql", "function": "app.record", "needs": ["nap"]}]}');
});

subtest 'retry backoff spacing' => sub {
	$node->safe_psql('postgres', q{
CREATE FUNCTION app.always_busy(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
END
$$;
SELECT orch.define_workflow('backoff', '{"steps": [
  {"name": "busy", "kind": "sql", "function": "app.always_busy",
   "retry": {"max_attempts": 4, "initial_interval": "200ms", "backoff_coefficient": 2,
             "max_interval": "1s"}}]}');
});
	my $run = start_run('backoff');
	is(wait_run($run), 'failed', 'the run fails once its attempts are spent');
	is(sql("SELECT error->>'step' || ' ' || (error->>'attempt') || ' ' || (error->>'gave_up')
	          FROM orch.runs WHERE run_id = '$run'"),
		'busy 4 no attempts left', 'the run names the step, its last attempt and why it gave up');

	my $attempts = "orch.attempts WHERE run_id = '$run'";
	is(sql("SELECT count(*) FROM $attempts"), '4', 'exactly 4 attempts');
	is(sql("SELECT string_agg(attempt::text, ',' ORDER BY started_at) FROM $attempts"),
		'1,2,3,4', 'attempts are numbered 1..4 in the order they started');
	is(sql("SELECT count(*) FROM $attempts
	          AND outcome = 'failed' AND error_class = 'transient' AND sqlstate = '40001'"),
		'4', 'each attempt failed with class transient (SQLSTATE 40001)');

	# The delay after attempt n is 200ms * 2^(n-1), at most 1s.
	for my $n (1 .. 3)
	{
		my $min_ms = 200 * 2**($n - 1);
		$min_ms = 1000 if $min_ms > 1000;
		my ($ok, $gap) = split /\|/, sql(qq{
			SELECT b.started_at >= a.finished_at + interval '$min_ms milliseconds',
				   round(extract(epoch FROM b.started_at - a.finished_at) * 1000)
			  FROM orch.attempts a JOIN orch.attempts b
				ON b.step_id = a.step_id AND b.attempt = a.attempt + 1
			 WHERE a.run_id = '$run' AND a.attempt = $n}) // '|';
		is($ok, 't', "attempt " . ($n + 1) . " started at least $min_ms ms after attempt $n finished")
		  or diag("gap was $gap ms");
	}
};

subtest 'circuit breaker under the engine' => sub {
	$node->safe_psql('postgres', q{
SELECT orch.define_circuit('target_api', threshold => 2, cooldown => '2 seconds');
CREATE TABLE app.target (healthy boolean NOT NULL);
INSERT INTO app.target VALUES (false);
CREATE FUNCTION app.call_target(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	IF NOT (SELECT healthy FROM app.target) THEN
		RAISE EXCEPTION 'target unreachable' USING ERRCODE = 'ORTRN';
	END IF;
	RETURN '{"called": true}';
END
$$;
SELECT orch.define_workflow('guarded', '{"steps": [
  {"name": "call", "kind": "sql", "function": "app.call_target", "circuit": "target_api",
   "retry": {"max_attempts": 1}}]}');
});
	my $status = "SELECT state || ' ' || failures || ' ' || blocked_steps
	                FROM orch.circuit_status WHERE name = 'target_api'";

	is(wait_run(start_run('guarded')), 'failed', 'first run fails');
	is(sql($status), 'closed 1 0', 'one failure: the circuit is still closed');
	is(wait_run(start_run('guarded')), 'failed', 'second run fails');
	is(sql($status), 'open 2 0', 'two consecutive failures open the circuit');
	my $probe_after = sql("SELECT probe_after FROM orch.circuit_status WHERE name = 'target_api'");

	# The target recovers at once, but the circuit does not know that: the
	# next step must still wait for the cooldown instead of calling it.
	# (Healing it before the third run starts also keeps the probe from
	# failing if a loaded machine lets the cooldown pass during the checks.)
	$node->safe_psql('postgres', 'UPDATE app.target SET healthy = true');
	my $run = start_run('guarded');
	$node->poll_query_until('postgres',
		"SELECT status NOT IN ('pending', 'ready') FROM orch.steps WHERE run_id = '$run'")
	  or die 'the engine never looked at the third run';
	is(sql("SELECT status || ' ' || attempt FROM orch.steps WHERE run_id = '$run'"),
		'blocked 0', "the third run's step waits blocked while the circuit is open");
	is(sql("SELECT count(*) FROM orch.attempts WHERE run_id = '$run'"), '0',
		'and has made no attempt');
	is(sql($status), 'open 2 1', 'circuit_status counts the blocked step');

	is(wait_run($run), 'succeeded', 'after the cooldown the third run succeeds');
	is(sql($status), 'closed 0 0', 'the successful probe closed the circuit');
	is(sql("SELECT string_agg(attempt || ':' || outcome, ',') FROM orch.attempts WHERE run_id = '$run'"),
		'1:succeeded', 'the blocked wait burned no attempt: one attempt, the probe');
	is(sql("SELECT started_at >= '$probe_after' FROM orch.attempts WHERE run_id = '$run'"),
		't', 'the probe went out no earlier than the cooldown allowed');
};

subtest 'task lease expiry: idempotent task retried by its policy' => sub {
	my $def = sql(q{
SELECT orch.define_workflow('task_idem', '{"steps": [
  {"name": "work", "kind": "task", "queue": "kq", "idempotent": true,
   "retry": {"max_attempts": 3, "initial_interval": "1s", "backoff_coefficient": 2}}]}')});
	ok(defined $def, 'a task step with "idempotent": true is accepted') or return;
	my $run = start_run('task_idem');

	# Worker 1 claims with a 1 s lease, then its session dies without a verdict.
	my $w1 = $node->background_psql('postgres');
	my $pid = $w1->query_safe('SELECT pg_backend_pid()');
	my $token = $w1->query_safe(
		"SELECT token FROM orch.claim_tasks('kq', 'w1', 1, '1 second', wait => '30s')");
	isnt($token, '', 'worker 1 claimed the task');
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
	$w1->quit;

	$node->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM orch.attempts WHERE run_id = '$run'")
	  or die 'the expired lease was never recorded';
	like(sql("SELECT status FROM orch.steps WHERE run_id = '$run'"), qr/^(retrying|waiting)$/,
		'after the expired lease the step is to be retried, not handed to a human');
	is(sql("SELECT attempt || ':' || kind || ':' || outcome || ':' || error_class
	          FROM orch.attempts WHERE run_id = '$run'"),
		'1:run:failed:transient', 'attempt 1 failed with class transient');
	like(sql("SELECT message FROM orch.attempts WHERE run_id = '$run'"), qr/lease.*expired/,
		'its message names the expired lease');
	is(sql("SELECT finished_at >= started_at + interval '1 second'
	          FROM orch.attempts WHERE run_id = '$run'"),
		't', 'the lease was not declared expired before it ran out');

	# Worker 2 tries at once: it gets the task only once the backoff is over.
	my $token2 = '';
	for (1 .. 3)
	{
		$token2 = claim('kq', 'w2', '30s');
		last if $token2 ne '';
	}
	isnt($token2, '', 'worker 2 claimed the task again') or return;
	$node->safe_psql('postgres', qq{SELECT orch.complete_task('$token2', '{"ok": true}')});
	is(wait_run($run), 'succeeded', 'the run succeeds after the second worker completes');
	is(sql("SELECT output FROM orch.steps WHERE run_id = '$run'"), '{"ok": true}',
		"the step's output is the second worker's");
	is(sql("SELECT string_agg(attempt || ':' || kind || ':' || outcome, ',' ORDER BY attempt, kind)
	          FROM orch.attempts WHERE run_id = '$run'"),
		'1:run:failed,2:run:succeeded', 'attempt 1 failed, attempt 2 succeeded');
	is(sql("SELECT count(*) FROM orch.attempts WHERE run_id = '$run' AND kind = 'run'"),
		'2', "exactly 2 attempts of kind 'run'");
	is(sql("SELECT b.started_at >= a.finished_at + interval '1 second'
	          FROM orch.attempts a JOIN orch.attempts b ON b.step_id = a.step_id
	         WHERE a.run_id = '$run' AND a.attempt = 1 AND a.kind = 'run'
	           AND b.attempt = 2 AND b.kind = 'run'"),
		't', 'the task was queued again only after the 1 s backoff');
};

subtest 'task lease expiry: not idempotent, needs a human' => sub {
	$node->safe_psql('postgres', q{
SELECT orch.define_workflow('task_plain', '{"steps": [
  {"name": "work", "kind": "task", "queue": "kq2",
   "retry": {"max_attempts": 3, "initial_interval": "1s", "backoff_coefficient": 2}}]}');
});
	my $run = start_run('task_plain');

	# A worker claims with a 1 s lease and its session ends: no verdict.
	isnt(claim('kq2', 'w1', '1 second'), '', 'a worker claimed the task');
	$node->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM orch.attempts WHERE run_id = '$run'")
	  or die 'the expired lease was never recorded';
	is(sql("SELECT attempt || ':' || outcome || ':' || error_class
	          FROM orch.attempts WHERE run_id = '$run'"),
		'1:failed:unknown_outcome', 'the expired lease is an unknown outcome');
	is(sql("SELECT status FROM orch.steps WHERE run_id = '$run'"), 'needs_human',
		'the step needs a human');
	is(sql("SELECT status FROM orch.runs WHERE run_id = '$run'"), 'needs_human',
		'the run needs a human');

	engine_barrier('after the unknown task outcome');
	is(sql("SELECT status FROM orch.steps WHERE run_id = '$run'"), 'needs_human',
		'later, the step still needs a human');
	is(sql("SELECT count(*) FROM orch.attempts WHERE run_id = '$run' AND kind = 'run'"), '1',
		'and still has 1 attempt');
	is(sql("SELECT coalesce(sum(waiting + running), 0) FROM orch.queue_status WHERE name = 'kq2'"),
		'0', 'the task is not in its queue');
	is(claim('kq2', 'w2', '30s', '0'), '', 'no worker can claim it again');
};

subtest 'a worker waiting for work sleeps until a task comes' => sub {
	$node->safe_psql('postgres', q{
SELECT orch.define_workflow('idle_task', '{"steps": [{"name": "work", "kind": "task", "queue": "idleq"}]}')});
	my $w = $node->background_psql('postgres');
	my $pid = $w->query_safe('SELECT pg_backend_pid()');
	$w->query_until(qr/waiting/, q{
\echo waiting
SELECT 'claimed ' || count(*) FROM orch.claim_tasks('idleq', 'w', 1, '1 min', wait => '20s');
});
	# Sampled 40 times over 2 s, the claim is nearly always asleep (wait
	# event Extension), not looking again and again.
	my $asleep = 0;
	for (1 .. 40)
	{
		$asleep++ if sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $pid") eq 'Extension';
		usleep(50_000);
	}
	cmp_ok($asleep, '>=', 30, "the waiting claim was asleep in $asleep of 40 samples");
	my $run = start_run('idle_task');
	like($w->query_until(qr/claimed \d/, ''), qr/claimed 1/, 'and it wakes up and claims the task queued');
	$w->quit;
	is(sql("SELECT status FROM orch.steps WHERE run_id = '$run'"), 'running', 'the task is leased');
};

subtest 'unknown outcome goes through verify' => sub {
	$node->safe_psql('postgres', q{
-- attempt 1 writes its effect, then loses track of it; later attempts succeed
CREATE TABLE app.unsure_effects (run_id uuid, attempt int);
CREATE FUNCTION app.unsure(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO app.unsure_effects VALUES ((ctx->>'run_id')::uuid, (ctx->>'attempt')::int);
	IF (ctx->>'attempt')::int = 1 THEN
		RAISE EXCEPTION 'connection lost after sending' USING ERRCODE = 'ORUNK';
	END IF;
	RETURN jsonb_build_object('done', ctx->'attempt');
END
$$;
CREATE TABLE app.verify_calls (run_id uuid, attempt text, error jsonb,
							   called_at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION app.verify_x(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	INSERT INTO app.verify_calls (run_id, attempt, error)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'attempt', ctx->'error');
	SELECT '{"applied": false}'::jsonb
$$;
CREATE FUNCTION app.verify_found(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	INSERT INTO app.verify_calls (run_id, attempt, error)
	VALUES ((ctx->>'run_id')::uuid, ctx->>'attempt', ctx->'error');
	SELECT '{"applied": true, "output": {"found": 1}}'::jsonb
$$;
});
	my $retry = '"retry": {"max_attempts": 3, "initial_interval": "100ms"}';
	my $rows = sub {
		my ($run) = @_;
		return sql("SELECT string_agg(attempt || ':' || kind || ':' || outcome || ':'
		                                || coalesce(error_class, ''), ',' ORDER BY attempt, kind)
		              FROM orch.attempts WHERE run_id = '$run' AND kind = 'run'");
	};

	# Case 1: verify says the effect was not applied: attempt 1 is retried.
	my $def = sql(qq{
SELECT orch.define_workflow('unsure_retry', '{"steps": [
  {"name": "pay", "kind": "sql", "function": "app.unsure", "verify": "app.verify_x", $retry}]}')});
	if (ok(defined $def, 'a sql step with "verify" is accepted'))
	{
		my $run = start_run('unsure_retry');
		is(wait_run($run), 'succeeded', 'not applied: the run succeeds');
		is($rows->($run), '1:run:failed:unknown_outcome,2:run:succeeded:',
			'run attempts: 1 unknown outcome, 2 succeeded');
		is(sql("SELECT count(*) FROM orch.attempts WHERE run_id = '$run' AND kind = 'verify' AND attempt = 1"),
			'1', 'one verify attempt, numbered as the attempt it verifies');
		is(sql("SELECT v.finished_at <= r.started_at
		          FROM orch.attempts v JOIN orch.attempts r ON r.step_id = v.step_id
		         WHERE v.run_id = '$run' AND v.kind = 'verify' AND r.kind = 'run' AND r.attempt = 2"),
			't', 'the verification finished before attempt 2 started');
		is(sql("SELECT count(*) || ' ' || bool_and(jsonb_typeof(error) = 'object')
		          FROM app.verify_calls WHERE run_id = '$run'"),
			'1 true', 'the verify function was called once, with ctx.error');
		note('verify ctx: ' . (sql("SELECT attempt || ' ' || error FROM app.verify_calls
		                             WHERE run_id = '$run'") // ''));
		is(sql("SELECT string_agg(attempt::text, ',') FROM app.unsure_effects WHERE run_id = '$run'"),
			'2', 'only the effect of attempt 2 remains');
	}

	# Case 2: verify finds the effect: the step succeeds with verify's output.
	$def = sql(qq{
SELECT orch.define_workflow('unsure_found', '{"steps": [
  {"name": "pay", "kind": "sql", "function": "app.unsure", "verify": "app.verify_found", $retry}]}')});
	if (ok(defined $def, 'a second workflow with "verify" is accepted'))
	{
		my $run = start_run('unsure_found');
		is(wait_run($run), 'succeeded', 'applied: the run succeeds');
		is(sql("SELECT status || ' ' || output FROM orch.steps WHERE run_id = '$run'"),
			'succeeded {"found": 1}', "the step succeeded with verify's output");
		is($rows->($run), '1:run:failed:unknown_outcome', 'the step was never run again');
		is(sql("SELECT count(*) FROM orch.attempts WHERE run_id = '$run' AND kind = 'verify'"),
			'1', 'one verify attempt');
		is(sql("SELECT count(*) FROM app.verify_calls WHERE run_id = '$run'"), '1',
			'the verify function was called once');
	}

	# Case 3: no verify function: a human decides, and nothing runs meanwhile.
	$node->safe_psql('postgres', qq{
SELECT orch.define_workflow('unsure_plain', '{"steps": [
  {"name": "pay", "kind": "sql", "function": "app.unsure", $retry}]}')});
	my $run = start_run('unsure_plain');
	$node->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM orch.attempts WHERE run_id = '$run'")
	  or die 'the unknown outcome was never recorded';
	is(sql("SELECT s.status || ' ' || r.status FROM orch.steps s JOIN orch.runs r USING (run_id)
	         WHERE s.run_id = '$run'"),
		'needs_human needs_human', 'without verify: step and run need a human');
	engine_barrier('after the unknown outcome');
	is($rows->($run), '1:run:failed:unknown_outcome', 'later, still only the one run attempt');
	is(sql("SELECT status FROM orch.steps WHERE run_id = '$run'"), 'needs_human',
		'and the step still needs a human');
};

$node->stop;
done_testing();
