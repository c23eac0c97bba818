# Shared set-up for orchestrator's TAP tests: a node with the extension
# preloaded, and the application schema the tests run steps from.
package OrchTest;

use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use Exporter 'import';

our @EXPORT = qw(orch_node orch_install_app);

# A started node with orchestrator preloaded; extra settings appended.
sub orch_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%{ $opts{init} // {} });
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'orchestrator'
orchestrator.launcher_naptime = 1
max_worker_processes = 16
} . ($opts{conf} // ''));
	$node->start unless $opts{no_start};
	return $node;
}

# The extension and a business table that sql steps write to, in $db.
sub orch_install_app
{
	my ($node, $db) = @_;
	$node->safe_psql($db, q{
CREATE EXTENSION orchestrator;
CREATE SCHEMA app;
CREATE TABLE app.effects (run_id uuid NOT NULL, step text NOT NULL, attempt int);
CREATE FUNCTION app.record(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	INSERT INTO app.effects VALUES ((ctx->>'run_id')::uuid, ctx->>'step', (ctx->>'attempt')::int);
	SELECT jsonb_build_object('step', ctx->'step')
$$;
CREATE FUNCTION app.fail(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION 'step % always fails', ctx->>'step' USING ERRCODE = 'data_exception';
END
$$;
SELECT orch.define_workflow('chain3', '{"steps": [
  {"name": "one",   "kind": "sql", "function": "app.record"},
  {"name": "two",   "kind": "sql", "function": "app.record", "needs": ["one"]},
  {"name": "three", "kind": "sql", "function": "app.record", "needs": ["two"]}]}');
});
	# the launcher starts this database's engine once CREATE EXTENSION commits
	$node->poll_query_until($db,
		"SELECT count(*) > 0 FROM orch.engine_workers WHERE database = current_database()")
	  or die "no engine worker started in database $db";
	return;
}

1;
