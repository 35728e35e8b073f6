// Package bench holds the side-by-side load benchmarks of imds-proxy (issue
// 7), as Benchmark functions that report their figures as metrics: an
// in-process IMDS stand-in on loopback served directly, through nginx and
// through imds-proxy (BenchmarkMetadataGET, BenchmarkTokenPUT), the memory
// of a proxy minting tokens (BenchmarkMintMemory), and the upstream cost of
// bursts of AWS SDK credential fetches (BenchmarkCredentialBurst). Each
// also logs its figures as a table; none is asserted.
//
// b.N counts the requests, the mints or the bursts, so -benchtime bounds
// each benchmark in time or in count; every load is also cut off after a
// minute. `make bench` runs them with the counts the README quotes. go test
// without -bench runs only TestLoadAgainstStandIn, a check of the load
// generator that starts no process.
//
// Everything they start listens on loopback and is killed when the
// benchmark ends.
package bench
