// Package bench holds the side-by-side load benchmark of imds-proxy (issue 7):
// an in-process IMDS stand-in on loopback, the same load against it directly,
// through nginx and through imds-proxy, token minting, memory after a million
// mints, and the upstream cost of a burst of AWS SDK credential fetches.
//
// It is a test, TestBenchTable, that prints tables and asserts nothing about
// the figures. With IMDS_PROXY_BENCH=1 it runs the full benchmark (about two
// minutes, bounded to three); otherwise it runs a smoke version with tiny
// counts, so the code keeps compiling and working under go test ./....
//
// Everything it starts listens on loopback and is killed when the test ends.
package bench
