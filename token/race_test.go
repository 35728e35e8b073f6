//go:build race

package token_test

// raceEnabled is true in builds with the race detector.
const raceEnabled = true
