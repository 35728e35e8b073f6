package proxy

import (
	"fmt"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/workload"
)

// TestV1CallersQuotaInASidecar: in a sidecar every app shares one address;
// the socket's UID and the process's cgroup tell them apart, so an app
// flooding the table evicts only its own rows, however many User-Agents or
// executables it makes up.
func TestV1CallersQuotaInASidecar(t *testing.T) {
	evicted := map[string]int{}
	c := newV1Callers(64, func(reason string) { evicted[reason]++ })
	app, hostile := 1000, 0
	now := time.Now()
	c.record("10.0.1.23", "aws-cli/1.18.69", "/latest/meta-data/", attribution.Process{UID: &app, Executable: "/usr/bin/python3", Cgroup: "0::/kubepods/pod1/app"}, workload.Workload{}, imdsapi.V1Warn, now)
	c.record("10.0.1.23", "curl/7.61.1", "/latest/meta-data/", attribution.Process{UID: &app, Executable: "/usr/bin/curl", Cgroup: "0::/kubepods/pod1/app"}, workload.Workload{}, imdsapi.V1Warn, now)
	for i := 0; i < 500; i++ {
		now = now.Add(time.Millisecond)
		c.record("10.0.1.23", fmt.Sprintf("x/%d", i), "/latest/meta-data/", attribution.Process{UID: &hostile, Executable: fmt.Sprintf("/tmp/curl%d", i), Cgroup: "0::/kubepods/pod1/sidecar"}, workload.Workload{}, imdsapi.V1Warn, now)
	}
	held := map[int]int{}
	for _, row := range c.snapshot() {
		held[*row.UID]++
	}
	if held[app] != 2 || held[hostile] != c.quota || c.quota != 4 {
		t.Errorf("rows held by UID: %v (quota %d); want the app's 2 kept and the flooder at its quota 4", held, c.quota)
	}
	if evicted[evictedQuota] != 500-c.quota || evicted[evictedFull] != 0 {
		t.Errorf("evictions %v, want %d for quota and none for a full table", evicted, 500-c.quota)
	}
}

// TestV1CallersFullTableTakesFromTheGreediest: when many callers fill the
// table, a new caller's row replaces the oldest row of the caller holding
// the most, not the table's oldest row.
func TestV1CallersFullTableTakesFromTheGreediest(t *testing.T) {
	evicted := map[string]int{}
	c := newV1Callers(8, func(reason string) { evicted[reason]++ })
	now := time.Now()
	c.record("10.0.0.1", "quiet/1.0", "/", attribution.Process{}, workload.Workload{}, imdsapi.V1Warn, now) // the oldest row of all
	for i := 0; i < 4; i++ {
		now = now.Add(time.Second)
		c.record("10.0.0.2", fmt.Sprintf("busy/%d", i), "/", attribution.Process{}, workload.Workload{}, imdsapi.V1Warn, now)
	}
	for i := 0; i < 3; i++ {
		now = now.Add(time.Second)
		c.record(fmt.Sprintf("10.0.1.%d", i), "one/1.0", "/", attribution.Process{}, workload.Workload{}, imdsapi.V1Warn, now)
	}
	c.record("10.0.2.1", "new/1.0", "/", attribution.Process{}, workload.Workload{}, imdsapi.V1Warn, now.Add(time.Second))
	rows := c.snapshot()
	has := func(caller, ua string) bool {
		for _, r := range rows {
			if r.Caller == caller && r.UserAgent == ua {
				return true
			}
		}
		return false
	}
	if len(rows) != 8 || !has("10.0.0.1", "quiet/1.0") || has("10.0.0.2", "busy/0") || !has("10.0.2.1", "new/1.0") {
		t.Errorf("rows %+v: want the quiet caller's row kept and the busy caller's oldest gone", rows)
	}
	if evicted[evictedFull] != 1 {
		t.Errorf("evictions %v, want one for a full table", evicted)
	}
}

// TestV1CallersCountWhatBlockWouldRefuse: a row counts the calls its
// policy refused apart from the others, and names the policy its latest
// call met, so a report tells what --v1 block would still refuse after a
// workload went from warn to block.
func TestV1CallersCountWhatBlockWouldRefuse(t *testing.T) {
	c := newV1Callers(64, func(string) {})
	now := time.Now()
	for _, policy := range []imdsapi.V1Policy{imdsapi.V1Warn, imdsapi.V1Warn, imdsapi.V1Block} {
		c.record("10.0.1.23", "curl/8.5.0", "/latest/meta-data/", attribution.Process{}, workload.Workload{}, policy, now)
	}
	rows := c.snapshot()
	if len(rows) != 1 || rows[0].Count != 3 || rows[0].Blocked != 1 || rows[0].Policy != imdsapi.V1Block {
		t.Errorf("rows %+v: want one row of 3 calls, 1 blocked, latest under block", rows)
	}
}
