package deploy

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/ecs"
	ecstypes "github.com/aws/aws-sdk-go-v2/service/ecs/types"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// keyVolume is the volume mounted at the directory of c's --token-key-file,
// which must be writable: the proxy creates the file there.
func keyVolume(t *testing.T, where string, spec corev1.PodSpec, c corev1.Container) corev1.Volume {
	t.Helper()
	file := mustFlag(t, where, c.Args, "token-key-file")
	dir := filepath.Dir(file)
	i := slices.IndexFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == dir })
	if i < 0 {
		t.Fatalf("%s: --token-key-file=%s, but nothing is mounted at %s: the key would die with the container", where, file, dir)
	}
	if c.VolumeMounts[i].ReadOnly {
		t.Errorf("%s: %s is mounted read-only; the proxy creates its key there", where, dir)
	}
	return volume(t, spec, c.VolumeMounts[i].Name)
}

// TestTokenKeysOutliveTheProxy checks that every Kubernetes example keeps
// the token key where it survives a restart of the proxy: a sidecar's in its
// pod's memory-backed emptyDir, a node agent's on the node.
func TestTokenKeysOutliveTheProxy(t *testing.T) {
	for _, c := range []struct {
		base, key string
		init      int
	}{{"sidecar", "Deployment default/example-app", 0}, {"sidecar-init", "Deployment default/example-app", 1}} {
		d := deployment(t, c.base, c.key)
		spec := d.Spec.Template.Spec
		if len(spec.InitContainers) <= c.init {
			t.Fatalf("%s: no init container %d", c.base, c.init)
		}
		v := keyVolume(t, c.base, spec, spec.InitContainers[c.init])
		if v.EmptyDir == nil || v.EmptyDir.Medium != corev1.StorageMediumMemory {
			t.Errorf("%s: the key is on volume %s, want a memory-backed emptyDir (it never reaches a disk, and goes with the pod)", c.base, toYAML(v))
		}
	}

	var ds appsv1.DaemonSet
	builtObject(t, kustomizeBuild(t, filepath.Join(kubernetesDir, "node")), "DaemonSet imds-proxy/imds-proxy-node", &ds)
	spec := ds.Spec.Template.Spec
	v := keyVolume(t, "node agent", spec, spec.Containers[0])
	if v.HostPath == nil || v.HostPath.Path != "/var/lib/imds-proxy" || v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectoryOrCreate {
		t.Errorf("node agent: the key is on volume %s, want hostPath /var/lib/imds-proxy (DirectoryOrCreate), which outlives the pod", toYAML(v))
	}
}

// TestECSNodeDaemonKeepsItsTokenKey checks the ECS node daemon keeps its key
// on the instance, and that the sidecar, whose exit stops its task and with
// it every client that holds its tokens, needs none.
func TestECSNodeDaemonKeepsItsTokenKey(t *testing.T) {
	var task ecs.RegisterTaskDefinitionInput
	readECS(t, "node-daemon-task-definition.json", &task)
	if len(task.ContainerDefinitions) != 1 {
		t.Fatalf("%d containers, want 1", len(task.ContainerDefinitions))
	}
	c := task.ContainerDefinitions[0]
	file := mustFlag(t, "ECS node daemon", c.Command, "token-key-file")
	dir := filepath.Dir(file)
	i := slices.IndexFunc(c.MountPoints, func(m ecstypes.MountPoint) bool { return deref(m.ContainerPath) == dir })
	if i < 0 {
		t.Fatalf("--token-key-file=%s, but nothing is mounted at %s", file, dir)
	}
	if deref(c.MountPoints[i].ReadOnly) {
		t.Errorf("%s is mounted read-only; the proxy creates its key there", dir)
	}
	j := slices.IndexFunc(task.Volumes, func(v ecstypes.Volume) bool { return deref(v.Name) == deref(c.MountPoints[i].SourceVolume) })
	if j < 0 || task.Volumes[j].Host == nil || deref(task.Volumes[j].Host.SourcePath) != "/var/lib/imds-proxy" {
		t.Errorf("mount point %s: want a host volume at /var/lib/imds-proxy", deref(c.MountPoints[i].SourceVolume))
	}

	var sidecar ecs.RegisterTaskDefinitionInput
	readECS(t, "sidecar-task-definition.json", &sidecar)
	for _, c := range sidecar.ContainerDefinitions {
		if deref(c.Name) == "imds-proxy" && (!deref(c.Essential) || c.RestartPolicy != nil) {
			t.Errorf("the ECS sidecar is not essential, or restarts alone: its clients would outlive its random token key; " +
				"give it --token-key-file on a task-scoped volume")
		}
		if deref(c.Name) == "imds-proxy" && slices.ContainsFunc(c.Command, func(a string) bool { return strings.HasPrefix(a, "--token-key-file") }) {
			t.Error("the ECS sidecar has --token-key-file, but its tmpfs dies with the container: the key would not outlive it")
		}
	}
}
