"""The GraphQL documents DagsterUI (tests/support/webserver.py) sends to dagster-webserver: the
same fields the Dagster UI asks for, so a test sees what a user would (code locations, the
repository's jobs and config, sensors and schedules to stop, runs and their events)."""

from __future__ import annotations

WORKSPACE_QUERY = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
    ... on PythonError { message }
  }
}
"""

CONFIG_FIELDS = "fields { name description isRequired defaultValueAsJson configTypeKey }"

REPOSITORY_QUERY = f"""
query Repository($location: String!, $repository: String!) {{
  repositoryOrError(repositorySelector: {{
    repositoryLocationName: $location, repositoryName: $repository
  }}) {{
    __typename
    ... on Repository {{
      name
      jobs {{
        name
        description
        tags {{ key value }}
        solidHandles {{
          handleID
          solid {{
            definition {{
              __typename
              name
              description
              ... on SolidDefinition {{
                configField {{
                  isRequired
                  configType {{ key __typename ... on CompositeConfigType {{ {CONFIG_FIELDS} }} }}
                }}
              }}
            }}
          }}
        }}
      }}
      schedules {{ id name cronSchedule pipelineName scheduleState {{ status }} }}
      sensors {{ id name sensorState {{ status }} }}
    }}
    ... on PythonError {{ message }}
  }}
}}
"""

STOP_SENSOR_MUTATION = """
mutation StopSensor($id: String!) {
  stopSensor(id: $id) {
    __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""

STOP_SCHEDULE_MUTATION = """
mutation StopSchedule($id: String!) {
  stopRunningSchedule(id: $id) {
    __typename
    ... on ScheduleStateResult { scheduleState { status } }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""

DAEMON_HEALTH_QUERY = """
query DaemonHealth {
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}
"""

RUN_CONFIG_SCHEMA_QUERY = """
query RunConfigSchema($selector: PipelineSelector!, $runConfigData: RunConfigData) {
  runConfigSchemaOrError(selector: $selector) {
    __typename
    ... on RunConfigSchema {
      rootDefaultYaml
      isRunConfigValid(runConfigData: $runConfigData) {
        __typename
        ... on RunConfigValidationInvalid { errors { reason message } }
        ... on PythonError { message }
      }
    }
    ... on PythonError { message }
    ... on PipelineNotFoundError { message }
  }
}
"""

LAUNCH_RUN_MUTATION = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status tags { key value } } }
    ... on RunConfigValidationInvalid { errors { reason message } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status jobName tags { key value } }
    ... on PythonError { message }
    ... on RunNotFoundError { message }
  }
}
"""

METADATA_ENTRIES = """
metadataEntries {
  label
  __typename
  ... on MarkdownMetadataEntry { mdStr }
  ... on TextMetadataEntry { text }
  ... on IntMetadataEntry { intValue }
  ... on JsonMetadataEntry { jsonString }
}
"""

EVENTS_QUERY = f"""
query RunEvents($runId: ID!, $afterCursor: String) {{
  logsForRun(runId: $runId, afterCursor: $afterCursor, limit: 1000) {{
    __typename
    ... on EventConnection {{
      cursor
      hasMore
      events {{
        __typename
        ... on MessageEvent {{ message level }}
        ... on StepEvent {{ stepKey }}
        ... on ExecutionStepOutputEvent {{ outputName {METADATA_ENTRIES} }}
        ... on ExecutionStepFailureEvent {{
          error {{ message className }}
          failureMetadata {{ label description {METADATA_ENTRIES} }}
        }}
        ... on RunFailureEvent {{ pipelineName }}
      }}
    }}
    ... on PythonError {{ message }}
    ... on RunNotFoundError {{ message }}
  }}
}}
"""
