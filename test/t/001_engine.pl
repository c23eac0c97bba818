# The engine worker advances runs on its own: nobody connected drives them,
# an idle engine is woken on commit, and a step that raises is recorded
# while the worker carries on.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use OrchTest;

my $node = orch_node('engine');
orch_install_app($node, 'postgres');

# Start runs and disconnect: only read-only observers connect from here on.
$node->safe_psql('postgres',
	"SELECT orch.start_run('chain3', jsonb_build_object('i', g)) FROM generate_series(1, 50) g");
$node->poll_query_until('postgres',
	"SELECT count(*) = 50 FROM orch.runs WHERE status = 'succeeded'");
is($node->safe_psql('postgres',
	"SELECT count(*) FILTER (WHERE status = 'succeeded') || '/' || count(*) FROM orch.runs"),
	'50/50', 'runs finished with no client connected');
is($node->safe_psql('postgres', 'SELECT count(*) FROM app.effects'),
	'150', 'each of the 150 steps wrote its effect once');

# An idle engine: one 3-step run, timed from the client.  No assertion on
# time (shared machines are noisy); the benchmark measures latency.
sleep(1);
my @lat;
for my $i (1 .. 5)
{
	my $t0 = time;
	my $status = $node->safe_psql('postgres', qq{
		SELECT orch.start_run('chain3', '{"idle": $i}') AS id \\gset
		SELECT orch.wait_run(:'id', '30s')});
	push @lat, (time - $t0) * 1000;
	is($status, 'succeeded', "idle run $i succeeded");
}
my $server_ms = $node->safe_psql('postgres', q{
	SELECT round(extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY finished_at - created_at)) * 1000, 2)
	  FROM orch.runs WHERE input ? 'idle'});
diag(sprintf("3-step run on an idle engine: client round trip %.1f ms (median of 5, "
	  . "psql start-up included); created to finished on the server %s ms (median)",
	(sort { $a <=> $b } @lat)[2], $server_ms));

# A step that raises fails its run; the engine worker is the same process after.
my $pid_before = $node->safe_psql('postgres', 'SELECT pid FROM orch.engine_workers');
$node->safe_psql('postgres', q{
SELECT orch.define_workflow('broken', '{"steps": [
  {"name": "boom", "kind": "sql", "function": "app.fail", "retry": {"max_attempts": 2, "initial_interval": "10ms"}},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["boom"]}]}')});
my $failed = $node->safe_psql('postgres', q{
	SELECT orch.start_run('broken') AS id \gset
	SELECT orch.wait_run(:'id', '30s')});
is($failed, 'failed', 'a run whose step raises fails');
is($node->safe_psql('postgres', q{
	SELECT string_agg(attempt || ':' || outcome || ':' || sqlstate || ':' || message, ', ' ORDER BY attempt)
	  FROM orch.attempts a JOIN orch.runs r USING (run_id) WHERE r.workflow = 'broken'}),
	'1:failed:22000:step boom always fails, 2:failed:22000:step boom always fails',
	'both attempts are recorded with SQLSTATE and message');
is($node->safe_psql('postgres', q{
	SELECT error->>'step' || ' ' || (error->>'attempt') FROM orch.runs WHERE workflow = 'broken'}),
	'boom 2', 'the run names the failing step');
is($node->safe_psql('postgres', 'SELECT pid FROM orch.engine_workers'), $pid_before,
	'the engine worker survived the failing step');
is($node->safe_psql('postgres', q{
	SELECT orch.start_run('chain3', '{"after": true}') AS id \gset
	SELECT orch.wait_run(:'id', '30s')}),
	'succeeded', 'and goes on advancing runs');

# Waiting on a run in the transaction that started it could never end: refused.
my ($rc, $stdout, $stderr) = $node->psql('postgres',
	"SELECT orch.wait_run(orch.start_run('chain3'), '1s')");
like($stderr, qr/was started or changed by the current transaction/,
	'wait_run refuses to wait for a run its own transaction started');

# Off switch: with orchestrator.enabled = off nothing advances; on again, it does.
$node->safe_psql('postgres', "ALTER SYSTEM SET orchestrator.enabled = off; SELECT pg_reload_conf()");
sleep(1);
my $held = $node->safe_psql('postgres', "SELECT orch.start_run('chain3', '{\"held\": true}')");
sleep(1);
is($node->safe_psql('postgres', "SELECT status FROM orch.runs WHERE run_id = '$held'"),
	'pending', 'a disabled engine leaves runs alone');
$node->safe_psql('postgres', "ALTER SYSTEM RESET orchestrator.enabled; SELECT pg_reload_conf()");
ok($node->poll_query_until('postgres',
	"SELECT status = 'succeeded' FROM orch.runs WHERE run_id = '$held'"),
	'enabled again, the engine finishes it');

# The settings live under a reserved prefix: a typo is refused.
my ($ret, $out, $err) = $node->psql('postgres', "SET orchestrator.batchsize = 10");
like($err, qr/invalid configuration parameter name "orchestrator.batchsize"/,
	'unknown orchestrator.* settings are rejected');

$node->stop;
done_testing();
