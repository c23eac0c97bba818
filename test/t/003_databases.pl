# The launcher gives every database that has the extension its own engine
# worker and sealer, including databases created after start-up; databases without the
# extension have none; DROP DATABASE is not blocked by a worker; DROP
# EXTENSION does not deadlock with a busy engine; and nothing runs on a
# standby until it is promoted.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use OrchTest;

my $node = orch_node('primary', init => { allows_streaming => 1 });
orch_install_app($node, 'postgres');

# A database created after start-up, with the extension: a worker of its own.
$node->safe_psql('postgres', 'CREATE DATABASE late');
orch_install_app($node, 'late');
is($node->safe_psql('postgres',
	"SELECT string_agg(database, ',' ORDER BY database) FROM orch.engine_workers"),
	'late,postgres', 'each database with the extension has one engine worker');
is($node->safe_psql('late', q{
	SELECT orch.start_run('chain3') AS id \gset
	SELECT orch.wait_run(:'id', '30s')}),
	'succeeded', 'the new database runs its own workflows');

# A database without the extension gets no worker.
$node->safe_psql('postgres', 'CREATE DATABASE plain');
sleep(2);
is($node->safe_psql('postgres',
	"SELECT count(*) FROM orch.engine_workers WHERE database = 'plain'"),
	'0', 'a database without the extension has no worker');
ok($node->poll_query_until('postgres', q{
	SELECT string_agg(datname, ',' ORDER BY datname) = 'late,postgres' FROM pg_stat_activity
	 WHERE backend_type = 'orchestrator sealer'}),
	'each database with the extension has a sealer, the one without none');

# More workers per database, on reload.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET orchestrator.workers_per_database = 2; SELECT pg_reload_conf()");
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM orch.engine_workers WHERE database = 'late'"),
	'workers_per_database = 2 starts a second worker');
$node->safe_psql('postgres',
	"ALTER SYSTEM RESET orchestrator.workers_per_database; SELECT pg_reload_conf()");
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM orch.engine_workers WHERE database = 'late'"),
	'and back to one');

# DROP DATABASE asks the workers to leave instead of failing on them.
$node->safe_psql('postgres', 'DROP DATABASE late');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_database WHERE datname = 'late'"),
	'0', 'a database with an engine worker can be dropped');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM orch.engine_workers WHERE database IS NULL OR database = 'late'"),
	'0', 'its worker is gone');

# A new database from a template whose worker must step aside.
$node->safe_psql('postgres', 'CREATE DATABASE copy TEMPLATE postgres');
ok(1, 'CREATE DATABASE ... TEMPLATE of a database with a worker succeeds');

# DROP EXTENSION: the worker leaves.
$node->safe_psql('copy', 'DROP EXTENSION orchestrator CASCADE');
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 0 FROM orch.engine_workers WHERE database = 'copy'"),
	'DROP EXTENSION ends the worker of that database');
ok($node->poll_query_until('postgres', q{
	SELECT count(*) = 0 FROM pg_stat_activity
	 WHERE backend_type = 'orchestrator sealer' AND datname = 'copy'}),
	'and its sealer');

# DROP EXTENSION while the engine is busy, sealing every 10 ms and with
# runs in flight: it never fails on a deadlock with the engine's locks.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET orchestrator.audit_seal_interval = '10ms'; SELECT pg_reload_conf()");
$node->safe_psql('postgres', 'CREATE DATABASE churn');
my $drops_ok = 0;
for my $i (1 .. 8)
{
	orch_install_app($node, 'churn');
	$node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM orch.engine_workers WHERE database = 'churn'")
	  or last;
	$node->safe_psql('churn',
		"SELECT orch.start_run('chain3') FROM generate_series(1, 200)");
	my ($ret, $out, $err) = $node->psql('churn', 'DROP EXTENSION orchestrator CASCADE',
		timeout => $PostgreSQL::Test::Utils::timeout_default);
	if ($ret != 0)
	{
		diag("DROP EXTENSION, try $i: $err");
		last;
	}
	$drops_ok++;
	$node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM orch.engine_workers WHERE database = 'churn'")
	  or last;
	$node->safe_psql('churn', 'DROP SCHEMA IF EXISTS app CASCADE');
}
is($drops_ok, 8, 'DROP EXTENSION succeeds while the engine advances runs and seals');
$node->safe_psql('postgres', 'DROP DATABASE churn');
$node->safe_psql('postgres',
	"ALTER SYSTEM RESET orchestrator.audit_seal_interval; SELECT pg_reload_conf()");

# A streaming standby: no launcher or engine until promotion, then runs
# started on the primary finish there.
$node->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($node, 'base', has_streaming => 1);
$standby->start;
$node->safe_psql('postgres',
	"ALTER SYSTEM SET orchestrator.enabled = off; SELECT pg_reload_conf()");
sleep(1);
$node->safe_psql('postgres',
	"SELECT orch.start_run('chain3', jsonb_build_object('failover', g)) FROM generate_series(1, 20) g");
$node->wait_for_catchup($standby);
is($standby->safe_psql('postgres',
	"SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'orchestrator%'"),
	'0', 'no orchestrator process runs on a standby');
is($standby->safe_psql('postgres',
	"SELECT count(*) FROM orch.runs WHERE input ? 'failover' AND status = 'pending'"),
	'20', 'the standby has the pending runs');
$node->stop('immediate');
$standby->append_conf('postgresql.conf', 'orchestrator.enabled = on');
$standby->promote;
ok($standby->poll_query_until('postgres', q{
	SELECT count(*) = 20 FROM orch.runs WHERE input ? 'failover' AND status = 'succeeded'}),
	'after promotion the new primary finishes the runs');
is($standby->safe_psql('postgres', q{
	SELECT count(*) FROM app.effects e JOIN orch.runs r USING (run_id) WHERE r.input ? 'failover'}),
	'60', 'each step once');

$standby->stop;

# No background worker slot left for the sealer: the launcher says so and
# tries again; the engine works, and orch.seal_audit() seals on request.
my $tight = orch_node('tight', conf => qq{
max_worker_processes = 2
max_logical_replication_workers = 0
});
orch_install_app($tight, 'postgres');
ok($tight->wait_for_log(qr/could not start the sealer for database "postgres"/),
	'without a worker slot for the sealer, the launcher says so');
is($tight->safe_psql('postgres', q{
	SELECT orch.start_run('chain3') AS id \gset
	SELECT orch.wait_run(:'id', '30s')}),
	'succeeded', 'the engine still runs the workflows');
ok($tight->safe_psql('postgres', 'SELECT orch.seal_audit()') > 0,
	'and orch.seal_audit() seals');
is($tight->safe_psql('postgres', 'SELECT unsealed_rows FROM orch.audit_seal_status'),
	'0', 'everything');
$tight->stop;
done_testing();
