# Durable waits for events across the server's life: a wait_event step that
# waits through a restart takes an event sent afterwards; one sent before
# the run reaches its wait survives a crash and is taken after it; and a
# wait's timeout fires from the engine with no client connected, sending the
# step to the human queue.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use OrchTest;

my $node = orch_node('events');
orch_install_app($node, 'postgres');
$node->safe_psql('postgres', q{
SELECT orch.define_workflow('reply', '{"steps": [
  {"name": "answer", "kind": "wait_event", "event": "answered"},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["answer"]}]}');
SELECT orch.define_workflow('late', '{"steps": [
  {"name": "hold", "kind": "sleep", "duration": "3s"},
  {"name": "answer", "kind": "wait_event", "event": "answered", "needs": ["hold"]}]}');
SELECT orch.define_workflow('expiring', '{"steps": [
  {"name": "answer", "kind": "wait_event", "event": "answered", "timeout": "2s",
   "on_timeout": "human"}]}');
});

# A wait through a clean restart.
my $r1 = $node->safe_psql('postgres', "SELECT orch.start_run('reply')");
$node->poll_query_until('postgres',
	"SELECT status = 'waiting' FROM orch.steps WHERE run_id = '$r1' AND name = 'answer'")
  or die "the step did not start to wait";
$node->restart;
is($node->safe_psql('postgres',
	"SELECT status FROM orch.steps WHERE run_id = '$r1' AND name = 'answer'"),
	'waiting', 'the step still waits after a restart');
$node->safe_psql('postgres', "SELECT orch.send_event('$r1', 'answered', '{\"n\": 1}')");
$node->poll_query_until('postgres', "SELECT status = 'succeeded' FROM orch.runs WHERE run_id = '$r1'")
  or die "the run did not finish after the event";
is($node->safe_psql('postgres', "SELECT output FROM orch.steps WHERE run_id = '$r1' AND name = 'answer'"),
	'{"n": 1}', 'the event sent after the restart was taken');

# An event kept through a crash before the run reaches its wait.
my $r2 = $node->safe_psql('postgres', "SELECT orch.start_run('late')");
$node->safe_psql('postgres', "SELECT orch.send_event('$r2', 'answered', '{\"n\": 2}')");
$node->stop('immediate');
$node->start;
$node->poll_query_until('postgres', "SELECT status = 'succeeded' FROM orch.runs WHERE run_id = '$r2'")
  or die "the run did not finish after the crash";
is($node->safe_psql('postgres', qq{
	SELECT s.output::text || ' ' || (e.consumed_by = s.step_id)
	  FROM orch.steps s JOIN orch.events e USING (run_id)
	 WHERE s.run_id = '$r2' AND s.name = 'answer'}),
	'{"n": 2} true', 'the event sent before the crash was kept and taken once the run got there');

# A timeout fires from the engine alone: nobody is connected while it passes.
my $r3 = $node->safe_psql('postgres', "SELECT orch.start_run('expiring')");
sleep(3);
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM orch.human_queue WHERE run_id = '$r3'")
  or die "the timeout did not send the step to the human queue";
is($node->safe_psql('postgres', qq{
	SELECT r.status || ' ' || q.why || ' ' || (q.error->>'sqlstate')
	  FROM orch.runs r JOIN orch.human_queue q USING (run_id) WHERE r.run_id = '$r3'}),
	'needs_human no event came within its timeout ORTMO',
	'the expired wait is in the human queue, its run waiting for a person');
my ($step_id) = $node->safe_psql('postgres', "SELECT step_id FROM orch.human_queue WHERE run_id = '$r3'");
$node->safe_psql('postgres', "SELECT orch.resolve($step_id, 'provide_input', '{\"by\": \"phone\"}')");
$node->poll_query_until('postgres', "SELECT status = 'succeeded' FROM orch.runs WHERE run_id = '$r3'")
  or die "the resolved run did not finish";
pass('the resolved run finished');

$node->stop;
done_testing();
