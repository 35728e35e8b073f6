// Package deploy holds the deployment manifests; its tests check them.
package deploy
